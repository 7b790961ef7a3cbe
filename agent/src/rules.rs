//! TODO: rules
