//! QMP error classes and errors.
