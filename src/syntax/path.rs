//! The request path as policy sees it. Origins normalise a path before they route on it
//! (decode percent-encodings, merge slashes, resolve `..`), so a policy that tests the raw
//! string is walked around: `/ws/../admin` passes a `/ws` prefix and reaches `/admin`.
//! [`normalize`] gives the one form that every reasonable reading of the path agrees on, the
//! gate decides on it, and that is what the origin is sent; what cannot be brought to such a
//! form is refused (400). Anchors: nginx matches locations on the normalised URI; Envoy's
//! `normalize_path`, `merge_slashes` and `path_with_escaped_slashes_action`; HAProxy's
//! `normalize-uri`.

use std::borrow::Cow;

/// Why a path cannot be normalised safely. Each is answered 400.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PathError {
    /// Not an absolute path (`*`, or no leading `/`).
    NotAbsolute,
    /// A `%` not followed by two hex digits.
    BadEncoding,
    /// `%2F` or `%5C`: origins disagree on whether it separates segments.
    EncodedSlash,
    /// A raw `\`, which some servers read as `/`.
    Backslash,
    /// `%00`.
    Nul,
    /// `%25` followed by two hex digits: an origin that decodes twice sees another path.
    DoubleEncoded,
    /// `..` above the root.
    AboveRoot,
    /// A dot-segment with parameters (`..;x`), which some servers read as `..`.
    DotParameter,
}

impl PathError {
    /// A short text for the client.
    pub fn body(self) -> &'static str {
        match self {
            PathError::NotAbsolute => "The request path must start with '/'.\n",
            PathError::BadEncoding => "The request path has a malformed percent-encoding.\n",
            PathError::EncodedSlash => "Encoded '/' or '\\' is not allowed in the request path.\n",
            PathError::Backslash => "'\\' is not allowed in the request path.\n",
            PathError::Nul => "An encoded NUL is not allowed in the request path.\n",
            PathError::DoubleEncoded => {
                "A double percent-encoding is not allowed in the request path.\n"
            }
            PathError::AboveRoot => "The request path goes above the root ('..').\n",
            PathError::DotParameter => {
                "A '.' or '..' segment with parameters is not allowed in the request path.\n"
            }
        }
    }
}

/// The normal form of a request path (without its query), or why there is none:
/// percent-encodings of unreserved characters decoded and the others' hex digits in upper
/// case (RFC 3986 §2.3, §6.2.2.1–2), empty segments merged (`//` → `/`), then dot-segments
/// removed (§5.2.4), keeping a trailing `/`. Slashes are merged before dots are resolved:
/// that is the order an origin that merges slashes reads `/ws//../admin` in (as `/admin`),
/// and the other order would pass it as `/ws/admin`. Returns the input itself when it is
/// already normal (the common case: no allocation).
pub fn normalize(path: &str) -> Result<Cow<'_, str>, PathError> {
    let raw = path.as_bytes();
    if raw.first() != Some(&b'/') {
        return Err(PathError::NotAbsolute);
    }
    if raw.contains(&b'\\') {
        return Err(PathError::Backslash);
    }
    let decoded = decode_unreserved(path)?;
    if has_double_encoding(&decoded) {
        return Err(PathError::DoubleEncoded);
    }
    let mut out: Vec<&str> = Vec::new();
    let mut trailing_slash = false;
    for segment in decoded.split('/').skip(1) {
        trailing_slash = false;
        if segment.is_empty() {
            trailing_slash = true; // a merged "//", or the path's trailing "/"
            continue;
        }
        match segment {
            "." => trailing_slash = true,
            ".." => {
                out.pop().ok_or(PathError::AboveRoot)?;
                trailing_slash = true;
            }
            _ if is_dot_with_parameters(segment) => return Err(PathError::DotParameter),
            _ => out.push(segment),
        }
    }
    let mut normal = String::with_capacity(decoded.len());
    for segment in &out {
        normal.push('/');
        normal.push_str(segment);
    }
    if trailing_slash || out.is_empty() {
        normal.push('/');
    }
    if normal == path {
        Ok(Cow::Borrowed(path))
    } else {
        Ok(Cow::Owned(normal))
    }
}

/// Decodes `%XX` of unreserved characters; upper-cases the hex of the rest.
fn decode_unreserved(path: &str) -> Result<Cow<'_, str>, PathError> {
    let raw = path.as_bytes();
    let Some(first) = raw.iter().position(|&b| b == b'%') else {
        return Ok(Cow::Borrowed(path));
    };
    let mut out = Vec::with_capacity(raw.len());
    out.extend_from_slice(&raw[..first]);
    let mut i = first;
    while i < raw.len() {
        let b = raw[i];
        if b != b'%' {
            out.push(b);
            i += 1;
            continue;
        }
        let (Some(hi), Some(lo)) = (
            raw.get(i + 1).and_then(|&h| hex(h)),
            raw.get(i + 2).and_then(|&l| hex(l)),
        ) else {
            return Err(PathError::BadEncoding);
        };
        let v = hi << 4 | lo;
        match v {
            b'/' | b'\\' => return Err(PathError::EncodedSlash),
            0 => return Err(PathError::Nul),
            _ if is_unreserved(v) => out.push(v),
            _ => out.extend_from_slice(&[b'%', HEX[usize::from(hi)], HEX[usize::from(lo)]]),
        }
        i += 3;
    }
    // Only ASCII was replaced by ASCII, so what was UTF-8 still is.
    Ok(Cow::Owned(
        String::from_utf8(out).map_err(|_| PathError::BadEncoding)?,
    ))
}

/// `%25` (a literal `%`) followed by two hex digits: decoding twice gives another byte.
fn has_double_encoding(path: &str) -> bool {
    path.as_bytes().windows(5).any(|w| {
        w[0] == b'%' && w[1] == b'2' && w[2] == b'5' && hex(w[3]).is_some() && hex(w[4]).is_some()
    })
}

/// `.;x` or `..;x`, also with the `;` or dots percent-encoded: Tomcat and Jetty drop path
/// parameters and then resolve the dots.
fn is_dot_with_parameters(segment: &str) -> bool {
    let s = segment.as_bytes();
    let semi = match s.iter().position(|&b| b == b';') {
        Some(i) => i,
        None => match s.windows(3).position(|w| w.eq_ignore_ascii_case(b"%3b")) {
            Some(i) => i,
            None => return false,
        },
    };
    matches!(&s[..semi], b"." | b"..")
}

const HEX: &[u8; 16] = b"0123456789ABCDEF";

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// RFC 3986 §2.3.
fn is_unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn n(p: &str) -> Result<String, PathError> {
        normalize(p).map(Cow::into_owned)
    }

    #[test]
    fn normal_paths_are_returned_as_they_are() {
        for p in [
            "/",
            "/ws",
            "/ws/",
            "/ws/room?x",
            "/a/b.c/d~e",
            "/%C3%A9",
            "/a%20b",
        ] {
            assert!(matches!(normalize(p), Ok(Cow::Borrowed(_))), "{p}");
        }
    }

    #[test]
    fn the_audit_s_bypasses_are_normalised_or_refused() {
        assert_eq!(n("/ws/../admin"), Ok("/admin".into()));
        assert_eq!(n("/ws/%2e%2e/admin"), Ok("/admin".into()));
        assert_eq!(n("/ws/..%2Fadmin"), Err(PathError::EncodedSlash));
        assert_eq!(n("/ws//../admin"), Ok("/admin".into()));
    }

    #[test]
    fn dot_segments_slashes_and_encodings() {
        assert_eq!(n("/ws/./room"), Ok("/ws/room".into()));
        assert_eq!(n("/ws/room/.."), Ok("/ws/".into()));
        assert_eq!(n("/ws/room/."), Ok("/ws/room/".into()));
        assert_eq!(n("//ws///room//"), Ok("/ws/room/".into()));
        assert_eq!(n("/%77%73/r%6Fom"), Ok("/ws/room".into()));
        assert_eq!(n("/a%3fb"), Ok("/a%3Fb".into()));
        assert_eq!(n("/.."), Err(PathError::AboveRoot));
        assert_eq!(n("/ws/../../x"), Err(PathError::AboveRoot));
        assert_eq!(n("/ws/%5Cadmin"), Err(PathError::EncodedSlash));
        assert_eq!(n("/ws/\\admin"), Err(PathError::Backslash));
        assert_eq!(n("/ws/%252e%252e/admin"), Err(PathError::DoubleEncoded));
        assert_eq!(n("/ws/%25%32%65"), Err(PathError::DoubleEncoded));
        assert_eq!(n("/ws/100%25"), Ok("/ws/100%25".into()));
        assert_eq!(n("/ws/%zz"), Err(PathError::BadEncoding));
        assert_eq!(n("/ws/%4"), Err(PathError::BadEncoding));
        assert_eq!(n("/ws/%00"), Err(PathError::Nul));
        assert_eq!(n("/ws/..;/admin"), Err(PathError::DotParameter));
        assert_eq!(n("/ws/..%3Bx/admin"), Err(PathError::DotParameter));
        assert_eq!(n("/ws/a;b"), Ok("/ws/a;b".into()));
        assert_eq!(n("*"), Err(PathError::NotAbsolute));
        assert_eq!(n(""), Err(PathError::NotAbsolute));
    }
}
