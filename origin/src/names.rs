//! Names (and symlink targets) that are not UTF-8, carried inside imz as
//! UTF-8.
//!
//! The store, the wire and the gateway's cache name entries with `String`s,
//! but a name on disk, or from an NFS client, may be any bytes but `/` and
//! NUL: a legacy Latin-1 `café`, say. Each byte that is not part of a valid
//! UTF-8 character travels as one private-use character, U+F700 + byte
//! (such bytes are 0x80 or above, so U+F780..=U+F7FF). A name's own
//! characters in that range travel byte by byte the same way, so that the
//! mapping is one to one. Only the two edges convert: the origin's file
//! system calls and the gateway's NFS requests and replies; clients see
//! the bytes the disk has.

use std::borrow::Cow;
use std::ffi::OsStr;
use std::os::unix::ffi::{OsStrExt, OsStringExt};

const ESCAPE_BASE: u32 = 0xF700;

fn is_escape(c: char) -> bool {
    (0xF780..=0xF7FF).contains(&u32::from(c))
}

fn escape(byte: u8) -> char {
    char::from_u32(ESCAPE_BASE + u32::from(byte)).unwrap_or(char::REPLACEMENT_CHARACTER)
}

/// The name imz carries for the bytes `raw`.
pub fn from_bytes(raw: &[u8]) -> Cow<'_, str> {
    if let Ok(s) = std::str::from_utf8(raw)
        && !s.chars().any(is_escape)
    {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(raw.len() * 2);
    for chunk in raw.utf8_chunks() {
        for c in chunk.valid().chars() {
            if is_escape(c) {
                let mut buf = [0; 4];
                out.extend(c.encode_utf8(&mut buf).bytes().map(escape));
            } else {
                out.push(c);
            }
        }
        out.extend(chunk.invalid().iter().copied().map(escape));
    }
    Cow::Owned(out)
}

/// The bytes a name carried by imz stands for.
pub fn to_bytes(name: &str) -> Cow<'_, [u8]> {
    if !name.chars().any(is_escape) {
        return Cow::Borrowed(name.as_bytes());
    }
    let mut out = Vec::with_capacity(name.len());
    for c in name.chars() {
        if is_escape(c) {
            out.push((u32::from(c) - ESCAPE_BASE) as u8);
        } else {
            let mut buf = [0; 4];
            out.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
        }
    }
    Cow::Owned(out)
}

/// [`to_bytes`] as an `OsStr`, for file system calls.
pub fn to_os(name: &str) -> Cow<'_, OsStr> {
    match to_bytes(name) {
        Cow::Borrowed(b) => Cow::Borrowed(OsStr::from_bytes(b)),
        Cow::Owned(b) => Cow::Owned(std::ffi::OsString::from_vec(b)),
    }
}

/// A name for people to read: its bytes, with those that are not UTF-8
/// shown as U+FFFD.
pub fn display(name: &str) -> String {
    String::from_utf8_lossy(&to_bytes(name)).into_owned()
}

/// The name imz carries for a path or name given on a command line.
pub fn from_os(arg: &OsStr) -> String {
    from_bytes(arg.as_bytes()).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utf8_names_are_carried_as_they_are() {
        for name in ["plain", "café", "日本語", "emoji 🦀", ""] {
            assert!(matches!(from_bytes(name.as_bytes()), Cow::Borrowed(n) if n == name));
            assert!(matches!(to_bytes(name), Cow::Borrowed(b) if b == name.as_bytes()));
        }
    }

    #[test]
    fn other_bytes_round_trip() {
        let cases: &[&[u8]] = &[
            b"caf\xe9.txt",
            b"\xff\xfe",
            b"ok\xc3",
            b"\xc3\xa9\xe9",
            // A name holding the escape range itself (U+F781, U+F7FF).
            "a\u{F781}b\u{F7FF}".as_bytes(),
            b"\xef\x9e\x81\xe9",
        ];
        for raw in cases {
            let name = from_bytes(raw);
            assert_eq!(&*to_bytes(&name), *raw, "{name:?}");
            assert!(!name.contains('/') && !name.contains('\0'));
        }
    }

    #[test]
    fn distinct_bytes_give_distinct_names() {
        let a = from_bytes(b"\xe9");
        let b = from_bytes("\u{F7E9}".as_bytes());
        assert_ne!(a, b);
    }
}
