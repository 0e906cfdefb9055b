//! qapi
