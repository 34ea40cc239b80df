//! The challenge-response handshake.
