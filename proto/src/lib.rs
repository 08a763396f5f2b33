//! Wire formats and shared-memory rings.
