//! TODO: forward
