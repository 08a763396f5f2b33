//! Placeholder: the container registry (being written).
