//! TODO: topology
