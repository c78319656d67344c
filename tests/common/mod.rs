//! Code shared by the host integration tests (each file of tests/ is a crate of its own; not
//! every one uses every helper).
#![allow(dead_code)]

pub mod server;
pub mod shape;
