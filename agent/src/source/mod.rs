//! TODO: sources
