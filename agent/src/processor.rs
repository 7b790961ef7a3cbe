//! TODO: processor
