use super::Value;
use crate::Result;

/// Encodes a value as a protocol-4 pickle.
pub fn encode(value: &Value) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    encode_into(value, &mut out)?;
    Ok(out)
}

/// Appends the pickle of `value` to `out`.
pub fn encode_into(_value: &Value, _out: &mut Vec<u8>) -> Result<()> {
    todo!()
}
