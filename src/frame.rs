//! Python's length-prefixed frames.
