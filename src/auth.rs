//! The challenge-response handshake of `multiprocessing.connection`.
//!
//! Before a Python manager or client exchanges a single pickle, both sides prove they know the
//! shared authkey: each one sends a random challenge and checks the HMAC the other computes over
//! it. A manager server challenges first and answers second ([`server_handshake`]); a client does
//! the reverse ([`client_handshake`]). Six frames in all, each at most 256 bytes.
//!
//! Two generations of the algorithm are on the wire and must interoperate:
//!
//! * **Legacy (Python 3.8–3.11):** the challenge body is 20 random bytes and the answer is the raw
//!   16-byte HMAC-MD5 of the body.
//! * **Modern (Python 3.12+):** the body is `{sha256}` plus 40 random bytes, and the answer is
//!   `{name}` plus HMAC-*name* of the *whole* body (prefix included). Modern peers still answer
//!   20-byte challenges with raw MD5, and old peers answer a modern challenge with raw MD5 over all
//!   48 bytes, so the verifier accepts both forms.
//!
//! We challenge the modern way, accept raw MD5, `{md5}` and `{sha256}` answers, and
//! answer whichever form the peer chose. The SHA-3 digests Python also allows are refused with a
//! clear error, since no Python sends them unless explicitly told to.
//!
//! MD5 can be refused, for deployments whose policy forbids it: at run time
//! (`ServerConfig::legacy_auth`, `ClientConfig::legacy_auth`, which reach the handshake as a
//! [`LegacyAuth`] beside the key) or at build time (without the `legacy-md5` feature the
//! `md-5` crate is left out).
//! A refused MD5 answer gets `#FAILURE#`, as a wrong key does; a refused MD5 challenge is not
//! answered. Either way the error says MD5 was refused, not that the key was wrong.
//!
//! Deadlines are the caller's job: set socket timeouts before calling in, and a stalled peer
//! surfaces as [`Error::Timeout`], never as an authentication failure.

use std::fmt;
use std::io::{Read, Write};

use hmac::{Hmac, Mac};
#[cfg(feature = "legacy-md5")]
use md5::Md5;
use rand::rngs::OsRng;
use rand::RngCore;
use sha2::Sha256;

use crate::error::{Error, Result};
use crate::frame::{read_frame, write_frame, HANDSHAKE_MAX_FRAME};

/// Prefix of every challenge frame.
pub const CHALLENGE: &[u8] = b"#CHALLENGE#";
/// The verdict sent when the peer's answer was right.
pub const WELCOME: &[u8] = b"#WELCOME#";
/// The verdict sent when the peer's answer was wrong.
pub const FAILURE: &[u8] = b"#FAILURE#";

/// Random bytes after the `{sha256}` prefix in our challenges, as Python 3.12+ sends.
const CHALLENGE_RANDOM_LEN: usize = 40;
/// Digest we offer in our challenges.
const OFFERED_DIGEST: Digest = Digest::Sha256;
/// A body of exactly this length is a legacy challenge, answered with raw HMAC-MD5.
const LEGACY_CHALLENGE_LEN: usize = 20;
/// A response of this length is a legacy raw HMAC-MD5 answer.
const MD5_LEN: usize = 16;
/// Python looks for the closing `}` of a digest prefix in `message[1..10]`.
const PREFIX_SEARCH_END: usize = 10;
/// The hint for every failure a wrong key can cause; a refused digest does not get it.
const SAME_KEY: &str = " (check that both sides use the same authkey)";

/// The shared secret of a manager and its clients (Python's `authkey`).
///
/// The bytes never appear in logs or error messages: `Debug` prints `AuthKey(<redacted>)` and
/// there is no `Display`. An empty key is valid; Python authenticates with it as well.
#[derive(Clone)]
pub struct AuthKey {
    bytes: Vec<u8>,
}

impl AuthKey {
    /// Wraps the key bytes, e.g. `AuthKey::new(*b"abc")` or `AuthKey::new("abc")`.
    pub fn new(key: impl Into<Vec<u8>>) -> AuthKey {
        AuthKey { bytes: key.into() }
    }

    /// The raw key: for computing MACs, or for handing to a child process through its
    /// environment. Never print it.
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes
    }
}

impl fmt::Debug for AuthKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("AuthKey(<redacted>)")
    }
}

/// Whether HMAC-MD5, the only digest of Python 3.8–3.11's handshake, may prove a key.
///
/// A deployment's policy, not part of the secret, so it is an argument of every handshake
/// beside the key rather than something the key carries: one key serves under either.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LegacyAuth {
    /// MD5 answers are checked and MD5 challenges answered, as Python does (if this build
    /// has MD5 at all: without the `legacy-md5` feature it is refused either way).
    Allowed,
    /// MD5 is refused: an MD5 answer fails as a wrong one does, an MD5 challenge is not
    /// answered, and the error says why.
    Refused,
}

impl LegacyAuth {
    /// From a config's `legacy_auth` (`false`: `--no-legacy-auth`), which stays a `bool` so
    /// that the configs' public fields read as the flags do.
    pub fn from_flag(legacy_auth: bool) -> LegacyAuth {
        if legacy_auth {
            LegacyAuth::Allowed
        } else {
            LegacyAuth::Refused
        }
    }

    /// What computes `digest` under this policy, or why it is refused.
    fn hash(self, digest: Digest) -> std::result::Result<Hash, &'static str> {
        match digest {
            Digest::Sha256 => Ok(Hash::Sha256),
            Digest::Md5 if self == LegacyAuth::Refused => Err("legacy authentication is off"),
            #[cfg(feature = "legacy-md5")]
            Digest::Md5 => Ok(Hash::Md5),
            #[cfg(not(feature = "legacy-md5"))]
            Digest::Md5 => Err("this build has no MD5 (the legacy-md5 feature is off)"),
        }
    }
}

/// The HMAC digests a peer may ask for that we know, a subset of Python's allow-list.
/// Knowing MD5's name is not computing it: see [`Hash`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Digest {
    Md5,
    Sha256,
}

impl Digest {
    fn name(self) -> &'static [u8] {
        match self {
            Digest::Md5 => b"md5",
            Digest::Sha256 => b"sha256",
        }
    }
}

/// A digest this build computes, obtained only through [`LegacyAuth::hash`], so no MD5 is
/// computed where the policy refuses it and none exists without the `legacy-md5` feature.
#[derive(Clone, Copy, Debug)]
enum Hash {
    #[cfg(feature = "legacy-md5")]
    Md5,
    Sha256,
}

impl Hash {
    /// The HMAC of `msg` under `key`.
    fn mac(self, key: &AuthKey, msg: &[u8]) -> Vec<u8> {
        fn run<M: Mac + hmac::digest::KeyInit>(key: &[u8], msg: &[u8]) -> Vec<u8> {
            let mut mac = <M as Mac>::new_from_slice(key).expect("HMAC accepts keys of any length");
            mac.update(msg);
            mac.finalize().into_bytes().to_vec()
        }
        match self {
            #[cfg(feature = "legacy-md5")]
            Hash::Md5 => run::<Hmac<Md5>>(key.as_bytes(), msg),
            Hash::Sha256 => run::<Hmac<Sha256>>(key.as_bytes(), msg),
        }
    }

    /// Whether `tag` is exactly the HMAC of `msg` under `key`, compared in constant time.
    fn verify(self, key: &AuthKey, msg: &[u8], tag: &[u8]) -> bool {
        fn run<M: Mac + hmac::digest::KeyInit>(key: &[u8], msg: &[u8], tag: &[u8]) -> bool {
            let Ok(mut mac) = <M as Mac>::new_from_slice(key) else {
                return false;
            };
            mac.update(msg);
            mac.verify_slice(tag).is_ok()
        }
        match self {
            #[cfg(feature = "legacy-md5")]
            Hash::Md5 => run::<Hmac<Md5>>(key.as_bytes(), msg, tag),
            Hash::Sha256 => run::<Hmac<Sha256>>(key.as_bytes(), msg, tag),
        }
    }
}

/// How a challenge body or a response is to be interpreted, per Python 3.12's
/// `_get_digest_name_and_payload`.
#[derive(Debug, PartialEq, Eq)]
enum Form<'a> {
    /// No prefix: raw HMAC-MD5. The slice is the whole message.
    Legacy(&'a [u8]),
    /// `{name}` prefix with a digest we know. The slice is what follows the prefix.
    Prefixed(Digest, &'a [u8]),
}

impl Form<'_> {
    fn digest(&self) -> Digest {
        match self {
            Form::Legacy(_) => Digest::Md5,
            Form::Prefixed(digest, _) => *digest,
        }
    }
}

/// Splits `message` like Python does: 16 or 20 bytes is legacy whatever the content; otherwise a
/// `{name}` prefix with `}` at index 1..=9 naming a supported digest. Anything else yields a
/// lowercase reason suitable for an error message.
fn parse_form(message: &[u8]) -> std::result::Result<Form<'_>, String> {
    if message.len() == MD5_LEN || message.len() == LEGACY_CHALLENGE_LEN {
        return Ok(Form::Legacy(message));
    }
    let search_end = message.len().min(PREFIX_SEARCH_END);
    let close = match message.first() {
        Some(b'{') => message
            .get(1..search_end)
            .and_then(|s| s.iter().position(|&b| b == b'}'))
            .map(|i| i + 1),
        _ => None,
    };
    let Some(close) = close else {
        return Err(format!(
            "unexpected length ({} bytes) and no {{digest}} prefix",
            message.len()
        ));
    };
    let name = &message[1..close];
    let rest = &message[close + 1..];
    for digest in [Digest::Md5, Digest::Sha256] {
        if name == digest.name() {
            return Ok(Form::Prefixed(digest, rest));
        }
    }
    let shown = name.escape_ascii();
    if name == b"sha3_256" || name == b"sha3_384" {
        Err(format!(
            "unsupported digest {shown} (distq supports md5 and sha256)"
        ))
    } else {
        Err(format!("unsupported digest {shown}"))
    }
}

/// Reads one handshake frame, enforcing Python's 256-byte limit. An oversized frame is a
/// protocol violation here, not a reason to raise `--max-frame`.
fn read_handshake_frame<S: Read>(s: &mut S, buf: &mut Vec<u8>, what: &str) -> Result<()> {
    read_frame(s, HANDSHAKE_MAX_FRAME, buf).map_err(|e| match e {
        Error::FrameTooLarge { len, .. } if is_tls_record_header(len) => Error::protocol(
            "this peer speaks TLS; distq does not (yet): run the client without TLS \
             or put a TLS proxy in front",
        ),
        Error::FrameTooLarge { len, max } => Error::protocol(format!(
            "{what} of {len} bytes exceeds the handshake limit of {max} bytes"
        )),
        other => other,
    })
}

/// Whether a frame "length" is really the start of a TLS record: content type 22
/// (handshake) and major version 3, as in every ClientHello from SSL 3.0 to TLS 1.3
/// (e.g. 0x16030102, read as a 369,295,618-byte frame).
fn is_tls_record_header(len: u64) -> bool {
    len >> 24 == 0x16 && (len >> 16) & 0xff == 0x03 && (len >> 8) & 0xff <= 0x04
}

/// Challenges the peer and checks its answer (Python's `deliver_challenge`).
///
/// Sends `#CHALLENGE#{sha256}` plus 40 random bytes, accepts a raw 16-byte HMAC-MD5 of the body
/// (what Python 3.8–3.11 send) or `{md5|sha256}` plus the matching HMAC of the whole
/// body (Python 3.12+), and replies `#WELCOME#` or `#FAILURE#`.
///
/// Returns [`Error::AuthFailed`] if the answer was wrong, or MD5 and refused by `legacy`
/// (after sending `#FAILURE#`), and propagates [`Error::Timeout`], [`Error::Closed`] and I/O
/// errors unchanged.
pub fn deliver_challenge<S: Read + Write>(
    s: &mut S,
    key: &AuthKey,
    legacy: LegacyAuth,
) -> Result<()> {
    let mut frame = Vec::with_capacity(CHALLENGE.len() + 8 + CHALLENGE_RANDOM_LEN);
    frame.extend_from_slice(CHALLENGE);
    frame.push(b'{');
    frame.extend_from_slice(OFFERED_DIGEST.name());
    frame.push(b'}');
    let random_start = frame.len();
    frame.resize(random_start + CHALLENGE_RANDOM_LEN, 0);
    OsRng
        .try_fill_bytes(&mut frame[random_start..])
        .map_err(|e| Error::io("generating a random challenge", e.into()))?;
    write_frame(s, &frame)?;
    let body = &frame[CHALLENGE.len()..];

    let mut response = Vec::new();
    read_handshake_frame(s, &mut response, "the answer to our challenge")?;
    let failure = match parse_form(&response) {
        Ok(form) => {
            let (Form::Legacy(mac) | Form::Prefixed(_, mac)) = form;
            match legacy.hash(form.digest()) {
                Ok(hash) if hash.verify(key, body, mac) => None,
                Ok(_) => Some(format!(
                    "the peer's answer to our challenge was wrong{SAME_KEY}"
                )),
                Err(refused) => Some(format!(
                    "the peer answered our challenge with HMAC-MD5 (Python <= 3.11), \
                     refused: {refused}"
                )),
            }
        }
        Err(why) => Some(format!(
            "the peer's answer to our challenge is invalid: {why}{SAME_KEY}"
        )),
    };
    match failure {
        None => write_frame(s, WELCOME),
        Some(why) => {
            // The verdict is a courtesy; the failure is what the caller needs to hear about.
            let _ = write_frame(s, FAILURE);
            Err(Error::AuthFailed(why))
        }
    }
}

/// Answers the peer's challenge and reads its verdict (Python's `answer_challenge`).
///
/// A 20-byte body gets a raw 16-byte HMAC-MD5 (legacy peers); a `{name}` body gets `{name}` plus
/// HMAC-*name* over the whole body. Returns [`Error::Protocol`] if the peer sent no challenge, a
/// body shorter than 20 bytes or a digest we do not know, and [`Error::AuthFailed`] if it asks
/// for MD5 and `legacy` refuses it (sending nothing) or the verdict is anything but
/// `#WELCOME#`. Timeouts and closes propagate unchanged.
pub fn answer_challenge<S: Read + Write>(
    s: &mut S,
    key: &AuthKey,
    legacy: LegacyAuth,
) -> Result<()> {
    let mut frame = Vec::new();
    read_handshake_frame(s, &mut frame, "the peer's challenge")?;
    let Some(body) = frame.strip_prefix(CHALLENGE) else {
        return Err(Error::protocol(format!(
            "expected a challenge from the peer, got {} bytes not starting with #CHALLENGE#",
            frame.len()
        )));
    };
    if body.len() < LEGACY_CHALLENGE_LEN {
        return Err(Error::protocol(format!(
            "the peer's challenge is too short: {} bytes, at least {LEGACY_CHALLENGE_LEN} expected",
            body.len()
        )));
    }
    let form = parse_form(body)
        .map_err(|why| Error::protocol(format!("cannot answer the peer's challenge: {why}")))?;
    let hash = legacy.hash(form.digest()).map_err(|refused| {
        Error::AuthFailed(format!(
            "the peer's challenge asks for HMAC-MD5 (Python <= 3.11), refused: {refused}"
        ))
    })?;
    let answer = match form {
        Form::Legacy(_) => hash.mac(key, body),
        Form::Prefixed(digest, _) => {
            let mut answer = Vec::with_capacity(64);
            answer.push(b'{');
            answer.extend_from_slice(digest.name());
            answer.push(b'}');
            answer.extend(hash.mac(key, body));
            answer
        }
    };
    write_frame(s, &answer)?;

    let mut verdict = Vec::new();
    read_handshake_frame(s, &mut verdict, "the peer's verdict")?;
    if verdict == WELCOME {
        Ok(())
    } else if verdict == FAILURE {
        Err(Error::AuthFailed(format!(
            "the peer rejected our answer to its challenge{SAME_KEY}"
        )))
    } else {
        Err(Error::AuthFailed(format!(
            "the peer sent {} bytes instead of #WELCOME# after our answer{SAME_KEY}",
            verdict.len()
        )))
    }
}

/// The server side of the handshake: challenge first, then answer, as a Python manager
/// `Server` does for every accepted connection.
pub fn server_handshake<S: Read + Write>(
    s: &mut S,
    key: &AuthKey,
    legacy: LegacyAuth,
) -> Result<()> {
    deliver_challenge(s, key, legacy)?;
    answer_challenge(s, key, legacy)
}

/// The client side of the handshake: answer first, then challenge, as Python's
/// `multiprocessing.connection.Client` does.
pub fn client_handshake<S: Read + Write>(
    s: &mut S,
    key: &AuthKey,
    legacy: LegacyAuth,
) -> Result<()> {
    answer_challenge(s, key, legacy)?;
    deliver_challenge(s, key, legacy)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{self, Cursor};
    use std::os::unix::net::UnixStream;
    use std::thread;

    fn hex(bytes: &[u8]) -> String {
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    }

    fn key() -> AuthKey {
        AuthKey::new(*b"abc")
    }

    fn modern_body() -> Vec<u8> {
        let mut body = b"{sha256}".to_vec();
        body.extend(0u8..40);
        body
    }

    /// An in-memory peer: reads come from a scripted input, writes are recorded.
    struct Script {
        input: Cursor<Vec<u8>>,
        output: Vec<u8>,
    }

    impl Script {
        fn new(frames: &[&[u8]]) -> Script {
            let mut input = Vec::new();
            for f in frames {
                write_frame(&mut input, f).unwrap();
            }
            Script {
                input: Cursor::new(input),
                output: Vec::new(),
            }
        }

        fn sent(&self) -> Vec<Vec<u8>> {
            let mut cur = Cursor::new(&self.output[..]);
            let mut frames = Vec::new();
            let mut buf = Vec::new();
            while read_frame(&mut cur, 1024, &mut buf).is_ok() {
                frames.push(buf.clone());
            }
            frames
        }
    }

    impl Read for Script {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            self.input.read(buf)
        }
    }

    impl Write for Script {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.output.write(buf)
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    /// The HMAC `key` computes for `digest` (which this build must have).
    fn mac(digest: Digest, key: &AuthKey, msg: &[u8]) -> Vec<u8> {
        LegacyAuth::Allowed.hash(digest).unwrap().mac(key, msg)
    }

    fn md5_body() -> Vec<u8> {
        let mut body = b"{md5}".to_vec();
        body.extend([1u8; 30]);
        body
    }

    #[test]
    fn python_test_vectors() {
        assert_eq!(
            hex(&mac(Digest::Sha256, &key(), &modern_body())),
            "ee2b4cd766c1e0f5eb564525d250361f729d00e3948c83c5651d1cefdb97de31"
        );
    }

    #[cfg(feature = "legacy-md5")]
    #[test]
    fn python_legacy_test_vectors() {
        let legacy_body: Vec<u8> = (0u8..20).collect();
        assert_eq!(
            hex(&mac(Digest::Md5, &key(), &legacy_body)),
            "1b373176a84c1b044d9ba09795b53791"
        );
        assert_eq!(
            hex(&mac(Digest::Md5, &key(), &modern_body())),
            "3e4faf2fc53f133cd76571e5d3fb9fd5"
        );
    }

    fn answer_to(body: &[u8]) -> Result<Vec<u8>> {
        answer_with(LegacyAuth::Allowed, body)
    }

    /// What we answer under `legacy` to a challenge of `body`, followed by `#WELCOME#`.
    fn answer_with(legacy: LegacyAuth, body: &[u8]) -> Result<Vec<u8>> {
        let mut challenge = CHALLENGE.to_vec();
        challenge.extend_from_slice(body);
        let mut peer = Script::new(&[&challenge, WELCOME]);
        answer_challenge(&mut peer, &key(), legacy)?;
        Ok(peer.sent().remove(0))
    }

    #[test]
    fn answers_modern_challenges() {
        let answer = answer_to(&modern_body()).unwrap();
        assert_eq!(&answer[..8], b"{sha256}");
        assert_eq!(
            hex(&answer[8..]),
            "ee2b4cd766c1e0f5eb564525d250361f729d00e3948c83c5651d1cefdb97de31"
        );
        // sha384 (and the sha3 digests) are refused: Python never offers them, and
        // SHA-512's code would cost 16 KiB of every binary.
        let mut sha384 = b"{sha384}".to_vec();
        sha384.extend([1u8; 30]);
        assert!(matches!(answer_to(&sha384), Err(Error::Protocol(_))));
    }

    #[cfg(feature = "legacy-md5")]
    #[test]
    fn answers_legacy_challenges() {
        let legacy: Vec<u8> = (0u8..20).collect();
        assert_eq!(
            hex(&answer_to(&legacy).unwrap()),
            "1b373176a84c1b044d9ba09795b53791"
        );
        // A 20-byte body is legacy even if it looks prefixed, as in Python.
        let mut tricky = b"{sha256}".to_vec();
        tricky.extend([0u8; 12]);
        assert_eq!(answer_to(&tricky).unwrap().len(), 16);
        let md5 = md5_body();
        let answer = answer_to(&md5).unwrap();
        assert_eq!(&answer[..5], b"{md5}");
        assert_eq!(answer[5..], mac(Digest::Md5, &key(), &md5)[..]);
    }

    /// The policies that refuse MD5, each with the reason it gives: `Refused` and, in a build
    /// without the `legacy-md5` feature, `Allowed` too.
    fn refusing_md5() -> Vec<(LegacyAuth, &'static str)> {
        let strict = (LegacyAuth::Refused, "legacy authentication is off");
        if cfg!(feature = "legacy-md5") {
            vec![strict]
        } else {
            vec![strict, (LegacyAuth::Allowed, "the legacy-md5 feature is off")]
        }
    }

    /// A policy refusing MD5 answers no MD5 challenge, raw or `{md5}`: nothing is sent and the
    /// error says why. A SHA-256 challenge is still answered.
    #[test]
    fn md5_challenges_are_not_answered_when_refused() {
        for &(legacy, reason) in &refusing_md5() {
            for body in [(0u8..20).collect(), md5_body()] {
                let mut challenge = CHALLENGE.to_vec();
                challenge.extend_from_slice(&body);
                let mut peer = Script::new(&[&challenge, WELCOME]);
                match answer_challenge(&mut peer, &key(), legacy) {
                    Err(Error::AuthFailed(why)) => {
                        assert!(why.contains("HMAC-MD5") && why.contains(reason), "{why}")
                    }
                    other => panic!("{other:?}"),
                }
                assert!(peer.sent().is_empty(), "answered {:?}", peer.sent());
            }
            assert_eq!(answer_with(legacy, &modern_body()).unwrap()[..8], *b"{sha256}");
        }
    }

    #[test]
    fn answer_rejects_bad_challenges() {
        assert!(matches!(answer_to(&[0u8; 19]), Err(Error::Protocol(_))));
        assert!(matches!(answer_to(b""), Err(Error::Protocol(_))));
        let mut sha512 = b"{sha512}".to_vec();
        sha512.extend([0u8; 40]);
        assert!(matches!(answer_to(&sha512), Err(Error::Protocol(_))));
        let mut sha3 = b"{sha3_256}".to_vec();
        sha3.extend([0u8; 40]);
        match answer_to(&sha3) {
            Err(Error::Protocol(msg)) => assert!(msg.contains("unsupported digest sha3_256")),
            other => panic!("unexpected {other:?}"),
        }
        assert!(matches!(answer_to(&[0u8; 21]), Err(Error::Protocol(_))));

        let mut peer = Script::new(&[b"#WELCOME#"]);
        assert!(matches!(
            answer_challenge(&mut peer, &key(), LegacyAuth::Allowed),
            Err(Error::Protocol(_))
        ));
        let mut peer = Script::new(&[]);
        assert!(matches!(
            answer_challenge(&mut peer, &key(), LegacyAuth::Allowed),
            Err(Error::Closed)
        ));
        let mut peer = Script::new(&[&[b'#'; 257]]);
        assert!(matches!(
            answer_challenge(&mut peer, &key(), LegacyAuth::Allowed),
            Err(Error::Protocol(_))
        ));
    }

    #[test]
    fn answer_reports_rejection() {
        let mut challenge = CHALLENGE.to_vec();
        challenge.extend(modern_body());
        for verdict in [FAILURE, b"#WELCOME", b""] {
            let mut peer = Script::new(&[&challenge, verdict]);
            assert!(matches!(
                answer_challenge(&mut peer, &key(), LegacyAuth::Allowed),
                Err(Error::AuthFailed(_))
            ));
        }
    }

    /// How a scripted peer answers a challenge body.
    type Responder = fn(&[u8]) -> Vec<u8>;

    /// Runs `deliver_challenge` against a peer that answers with `respond(body)`, returning the
    /// outcome and the verdict frame sent.
    fn deliver_with(respond: Responder) -> (Result<()>, Vec<u8>) {
        deliver_as(LegacyAuth::Allowed, respond)
    }

    /// [`deliver_with`], checking the answer under `legacy`.
    fn deliver_as(legacy: LegacyAuth, respond: Responder) -> (Result<()>, Vec<u8>) {
        let (mut ours, mut theirs) = UnixStream::pair().unwrap();
        let peer = thread::spawn(move || {
            let mut buf = Vec::new();
            read_frame(&mut theirs, 256, &mut buf).unwrap();
            assert_eq!(buf.len(), 11 + 48);
            assert!(buf.starts_with(b"#CHALLENGE#{sha256}"));
            write_frame(&mut theirs, &respond(&buf[11..])).unwrap();
            read_frame(&mut theirs, 256, &mut buf).unwrap();
            buf
        });
        let result = deliver_challenge(&mut ours, &key(), legacy);
        (result, peer.join().unwrap())
    }

    fn prefixed(digest: Digest, body: &[u8]) -> Vec<u8> {
        let mut out = vec![b'{'];
        out.extend_from_slice(digest.name());
        out.push(b'}');
        out.extend(mac(digest, &key(), body));
        out
    }

    #[test]
    fn deliver_accepts_sha256_answers() {
        let (result, verdict) = deliver_with(|b| prefixed(Digest::Sha256, b));
        assert!(result.is_ok(), "{result:?}");
        assert_eq!(verdict, WELCOME);
    }

    #[cfg(feature = "legacy-md5")]
    #[test]
    fn deliver_accepts_md5_answers() {
        let answers: [Responder; 2] = [
            |b| mac(Digest::Md5, &key(), b),
            |b| prefixed(Digest::Md5, b),
        ];
        for respond in answers {
            let (result, verdict) = deliver_with(respond);
            assert!(result.is_ok(), "{result:?}");
            assert_eq!(verdict, WELCOME);
        }
    }

    /// A policy refusing MD5 refuses an MD5 answer, raw or `{md5}`, as it refuses a wrong one
    /// (`#FAILURE#`), even when its MAC is right, and the error says why; a SHA-256 answer
    /// still passes.
    #[test]
    fn md5_answers_are_refused_like_wrong_ones() {
        // Right MACs where this build can compute them, else any bytes of an MD5 answer's form.
        #[cfg(feature = "legacy-md5")]
        let md5_answers: [Responder; 2] = [
            |b| mac(Digest::Md5, &key(), b),
            |b| prefixed(Digest::Md5, b),
        ];
        #[cfg(not(feature = "legacy-md5"))]
        let md5_answers: [Responder; 2] = [
            |_| vec![7u8; 16],
            |_| {
                let mut a = b"{md5}".to_vec();
                a.extend([7u8; 16]);
                a
            },
        ];
        for &(legacy, reason) in &refusing_md5() {
            for respond in md5_answers {
                let (result, verdict) = deliver_as(legacy, respond);
                match result {
                    Err(Error::AuthFailed(why)) => {
                        assert!(why.contains("HMAC-MD5") && why.contains(reason), "{why}")
                    }
                    other => panic!("{other:?}"),
                }
                assert_eq!(verdict, FAILURE);
            }
            let (result, verdict) = deliver_as(legacy, |b| prefixed(Digest::Sha256, b));
            assert!(result.is_ok(), "{result:?}");
            assert_eq!(verdict, WELCOME);
        }
    }

    #[test]
    fn deliver_rejects_wrong_answers() {
        let answers: [Responder; 10] = [
            // A MAC of MD5's length, so read as one.
            |b| mac(Digest::Sha256, &key(), b)[..16].to_vec(),
            |b| prefixed(Digest::Sha256, &b[1..]),
            |b| {
                let mut a = prefixed(Digest::Sha256, b);
                a.pop();
                a
            },
            |b| prefixed(Digest::Sha256, b)[..20].to_vec(),
            |b| mac(Digest::Sha256, &key(), b)[..20].to_vec(),
            |_| {
                let mut a = b"{sha512}".to_vec();
                a.extend([0u8; 64]);
                a
            },
            |_| b"{sha256".to_vec(),
            |_| b"{}".to_vec(),
            |_| Vec::new(),
            |_| vec![b'x'; 256],
        ];
        for respond in answers {
            let (result, verdict) = deliver_with(respond);
            assert!(matches!(result, Err(Error::AuthFailed(_))), "{result:?}");
            assert_eq!(verdict, FAILURE);
        }
    }

    #[test]
    fn parse_form_never_panics() {
        let mut msg = Vec::new();
        for len in 0..=256usize {
            for fill in [b'{', b'}', b'a', 0] {
                msg.clear();
                msg.resize(len, fill);
                let _ = parse_form(&msg);
                if len > 0 {
                    msg[0] = b'{';
                    let _ = parse_form(&msg);
                }
            }
        }
        // `}` must sit at index 9 at the latest.
        assert!(parse_form(b"{sha256}0123456789abcdef0123").is_ok());
        assert!(parse_form(b"{sha256xx}0123456789abcdef0123").is_err());
        assert!(parse_form(b"{sha3_384}0123456789abcdef0123")
            .unwrap_err()
            .contains("unsupported digest sha3_384"));
    }

    fn handshake(server_key: AuthKey, client_key: AuthKey) -> (Result<()>, Result<()>) {
        handshake_under(
            (server_key, LegacyAuth::Allowed),
            (client_key, LegacyAuth::Allowed),
        )
    }

    /// A whole handshake between a server and a client, each with its key and policy.
    fn handshake_under(
        (server_key, server_legacy): (AuthKey, LegacyAuth),
        (client_key, client_legacy): (AuthKey, LegacyAuth),
    ) -> (Result<()>, Result<()>) {
        let (mut server_end, mut client_end) = UnixStream::pair().unwrap();
        let server = thread::spawn(move || {
            server_handshake(&mut server_end, &server_key, server_legacy)
        });
        let client = client_handshake(&mut client_end, &client_key, client_legacy);
        (server.join().unwrap(), client)
    }

    #[test]
    fn full_handshake_same_key() {
        let (server, client) = handshake(key(), key());
        assert!(server.is_ok(), "{server:?}");
        assert!(client.is_ok(), "{client:?}");
        let (server, client) = handshake(AuthKey::new(""), AuthKey::new(Vec::new()));
        assert!(server.is_ok() && client.is_ok());
    }

    /// A server refusing MD5 and a client that allows it agree on SHA-256 both ways.
    #[test]
    fn a_strict_side_and_a_lenient_one_speak_sha256() {
        let strict = (key(), LegacyAuth::Refused);
        let lenient = (key(), LegacyAuth::Allowed);
        let (server, client) = handshake_under(strict.clone(), lenient.clone());
        assert!(server.is_ok() && client.is_ok(), "{server:?} {client:?}");
        let (server, client) = handshake_under(lenient, strict);
        assert!(server.is_ok() && client.is_ok(), "{server:?} {client:?}");
    }

    #[test]
    fn full_handshake_different_keys() {
        let (server, client) = handshake(key(), AuthKey::new("abd"));
        assert!(matches!(server, Err(Error::AuthFailed(_))), "{server:?}");
        assert!(matches!(client, Err(Error::AuthFailed(_))), "{client:?}");
    }

    #[test]
    fn timeouts_are_not_auth_failures() {
        let (mut ours, _theirs) = UnixStream::pair().unwrap();
        ours.set_read_timeout(Some(std::time::Duration::from_millis(20)))
            .unwrap();
        assert!(matches!(
            answer_challenge(&mut ours, &key(), LegacyAuth::Allowed),
            Err(Error::Timeout(_))
        ));
        assert!(matches!(
            deliver_challenge(&mut ours, &key(), LegacyAuth::Allowed),
            Err(Error::Timeout(_))
        ));
    }

    #[test]
    fn debug_redacts_key() {
        let shown = format!("{:?}", AuthKey::new("s3cret-key"));
        assert_eq!(shown, "AuthKey(<redacted>)");
        assert!(!shown.contains("s3cret"));
    }
}
