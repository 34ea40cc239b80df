use super::Value;
use std::fmt;

pub(crate) fn write_repr(_v: &Value, _f: &mut fmt::Formatter<'_>) -> fmt::Result {
    todo!()
}
