pub mod error;
pub mod pickle;

pub use error::{Error, Result};
pub use pickle::Value;
