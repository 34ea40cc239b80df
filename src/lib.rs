pub mod auth;
pub mod error;
pub mod frame;
pub mod pickle;

pub use error::{Error, Result};
pub use pickle::Value;
