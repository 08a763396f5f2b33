//! Placeholder: the simulated cluster (being written).
