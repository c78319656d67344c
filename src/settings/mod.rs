//! Settings: the typed model ([`model`]), the atomic datastore with named transactions on the
//! PRIVATE partition ([`store`]), and turning settings into files and effects ([`render`]).

pub mod boot;
pub mod bootstrap;
pub mod kubelet;
pub mod model;
pub mod refused;
pub mod render;
pub mod static_pods;
pub mod store;

pub use store::Datastore;
