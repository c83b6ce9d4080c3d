//! The server name of a TLS ClientHello, read without terminating TLS: how a TCP
//! listener shared by several farms picks one for a passthrough connection.
//!
//! [`read_hello`] reads exactly the records that carry the ClientHello (not one byte
//! more, so whatever follows stays in the socket) and returns them with the name; the
//! caller forwards those bytes untouched. [`parse`] is the pure parser under it. Bounds:
//! the hello is at most [`MAX_HELLO`] bytes in at most [`MAX_RECORDS`] records, so one
//! connection never holds more than [`MAX_RAW`] bytes here. The reader's buffer grows
//! only with bytes the client actually sent, and the parser allocates nothing until
//! the hello is complete (a hello split over several records is joined then).
//!
//! It refuses what could be read two ways: more than one name in `server_name`, an
//! extension that appears twice, bytes after the hello or inside it that do not add
//! up. Otherwise keyway could route on one name while the backend acts on another. It
//! must never panic on any input.

use tokio::io::{AsyncRead, AsyncReadExt};

/// Largest ClientHello message accepted (its handshake body). Real hellos, post-quantum
/// key shares included, are under 2 KiB.
pub const MAX_HELLO: usize = 16 * 1024;
/// Most TLS records one ClientHello may be split into.
pub const MAX_RECORDS: usize = 8;
/// Most bytes read for one hello: the message, its handshake header and record headers.
pub const MAX_RAW: usize = MAX_HELLO + 4 + MAX_RECORDS * 5;

/// Why a ClientHello was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SniError {
    /// The first bytes are not a TLS handshake record.
    #[error("the connection does not start with a TLS handshake record")]
    NotTls,
    /// Larger than [`MAX_HELLO`] or split into more than [`MAX_RECORDS`] records.
    #[error("the ClientHello is larger than {MAX_HELLO} bytes or split into more than {MAX_RECORDS} records")]
    TooLarge,
    /// Lengths that do not add up, or a field that is not what TLS allows.
    #[error("malformed ClientHello: {0}")]
    Malformed(&'static str),
    /// A hello that names its server in more than one way.
    #[error("ambiguous ClientHello: {0}")]
    Ambiguous(&'static str),
    /// The socket closed or failed before the hello was complete.
    #[error("connection closed or failed while reading the ClientHello: {0}")]
    Io(String),
}

/// The outcome of [`parse`] on the bytes read so far.
#[derive(Debug, PartialEq, Eq)]
pub enum Parsed {
    /// The hello is complete: its server name (lower case), if it sent one, and the
    /// number of bytes its records take.
    Done(Option<String>, usize),
    /// Exactly this many more bytes are needed before anything can be decided.
    Need(usize),
}

/// Reads the records of one ClientHello from `io`, exactly their bytes. Returns the
/// server name and the bytes read, to be passed on.
pub async fn read_hello<R>(io: &mut R) -> Result<(Option<String>, Vec<u8>), SniError>
where
    R: AsyncRead + Unpin,
{
    let mut buf = Vec::new();
    loop {
        match parse(&buf)? {
            Parsed::Done(name, len) => {
                debug_assert_eq!(len, buf.len(), "read past the hello");
                return Ok((name, buf));
            }
            Parsed::Need(n) => {
                debug_assert!(buf.len() + n <= MAX_RAW);
                let want = buf.len() + n;
                // `take` + `read_buf`: the buffer grows with what arrives, never ahead of it.
                while buf.len() < want {
                    let left = (want - buf.len()) as u64;
                    let got = (&mut *io)
                        .take(left)
                        .read_buf(&mut buf)
                        .await
                        .map_err(|e| SniError::Io(e.to_string()))?;
                    if got == 0 {
                        return Err(SniError::Io("end of stream".into()));
                    }
                }
            }
        }
    }
}

/// Parses the ClientHello at the start of `buf` (TLS records as sent on the wire).
pub fn parse(buf: &[u8]) -> Result<Parsed, SniError> {
    // Where each record's payload lies in `buf`: a fixed array, no allocation.
    let mut payloads = [(0usize, 0usize); MAX_RECORDS];
    let mut records = 0;
    let mut pos = 0;
    let mut have = 0; // handshake bytes seen so far
    let mut hello_len: Option<usize> = None;
    loop {
        if let Some(len) = hello_len {
            if have >= 4 + len {
                if have > 4 + len {
                    return Err(SniError::Malformed(
                        "more handshake bytes follow the ClientHello in its records",
                    ));
                }
                let name = if records == 1 {
                    let (start, _) = payloads[0];
                    parse_hello(&buf[start + 4..start + 4 + len])?
                } else {
                    // Complete and split over records: join it now (at most MAX_HELLO).
                    let mut joined = Vec::with_capacity(4 + len);
                    for &(s, e) in &payloads[..records] {
                        joined.extend_from_slice(&buf[s..e]);
                    }
                    parse_hello(&joined[4..])?
                };
                return Ok(Parsed::Done(name, pos));
            }
        }
        if records == MAX_RECORDS {
            return Err(SniError::TooLarge);
        }
        if buf.len() < pos + 5 {
            return Ok(Parsed::Need(pos + 5 - buf.len()));
        }
        let header = &buf[pos..pos + 5];
        if header[0] != 22 || header[1] != 3 {
            return Err(if pos == 0 {
                SniError::NotTls
            } else {
                SniError::Malformed("a record that is not a handshake interrupts the ClientHello")
            });
        }
        let len = usize::from(u16::from_be_bytes([header[3], header[4]]));
        if len == 0 {
            return Err(SniError::Malformed("an empty handshake record"));
        }
        if len > 16 * 1024 {
            return Err(SniError::Malformed("a record longer than 16 KiB"));
        }
        if buf.len() < pos + 5 + len {
            return Ok(Parsed::Need(pos + 5 + len - buf.len()));
        }
        payloads[records] = (pos + 5, pos + 5 + len);
        records += 1;
        pos += 5 + len;
        have += len;
        if hello_len.is_none() && have >= 4 {
            let at = |k: usize| -> u8 {
                let mut k = k;
                for &(s, e) in &payloads[..records] {
                    if k < e - s {
                        return buf[s + k];
                    }
                    k -= e - s;
                }
                0
            };
            if at(0) != 1 {
                return Err(SniError::Malformed(
                    "the first handshake message is not a ClientHello",
                ));
            }
            let len = usize::from(at(1)) << 16 | usize::from(at(2)) << 8 | usize::from(at(3));
            if len > MAX_HELLO {
                return Err(SniError::TooLarge);
            }
            hello_len = Some(len);
        }
    }
}

/// A cursor over a hello's body that fails instead of reading past its end.
struct Cursor<'a> {
    rest: &'a [u8],
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], SniError> {
        if self.rest.len() < n {
            return Err(SniError::Malformed(what));
        }
        let (head, tail) = self.rest.split_at(n);
        self.rest = tail;
        Ok(head)
    }

    fn u8(&mut self, what: &'static str) -> Result<usize, SniError> {
        Ok(usize::from(self.take(1, what)?[0]))
    }

    fn u16(&mut self, what: &'static str) -> Result<usize, SniError> {
        let b = self.take(2, what)?;
        Ok(usize::from(u16::from_be_bytes([b[0], b[1]])))
    }
}

/// The server name in a ClientHello body (after the handshake header).
fn parse_hello(body: &[u8]) -> Result<Option<String>, SniError> {
    let mut c = Cursor { rest: body };
    c.take(2 + 32, "shorter than its version and random")?;
    let session = c.u8("no session id length")?;
    if session > 32 {
        return Err(SniError::Malformed("a session id longer than 32 bytes"));
    }
    c.take(session, "a session id longer than the hello")?;
    let suites = c.u16("no cipher suites length")?;
    if suites < 2 || suites % 2 != 0 {
        return Err(SniError::Malformed("cipher suites of odd or zero length"));
    }
    c.take(suites, "cipher suites longer than the hello")?;
    let compression = c.u8("no compression methods length")?;
    if compression == 0 {
        return Err(SniError::Malformed("no compression method"));
    }
    c.take(compression, "compression methods longer than the hello")?;
    if c.rest.is_empty() {
        return Ok(None); // no extensions at all
    }
    let total = c.u16("no extensions length")?;
    if total != c.rest.len() {
        return Err(SniError::Malformed(
            "the extensions' length does not match the hello",
        ));
    }
    let mut seen = [0u64; 1024]; // one bit per extension type
    let mut name = None;
    while !c.rest.is_empty() {
        let kind = c.u16("a truncated extension")?;
        let len = c.u16("a truncated extension")?;
        let data = c.take(len, "an extension longer than the hello")?;
        let (word, bit) = (kind / 64, 1u64 << (kind % 64));
        if seen[word] & bit != 0 {
            return Err(SniError::Ambiguous("an extension appears twice"));
        }
        seen[word] |= bit;
        if kind == 0 {
            name = Some(server_name(data)?);
        }
    }
    Ok(name)
}

/// The one host name of a `server_name` extension, lower case.
fn server_name(data: &[u8]) -> Result<String, SniError> {
    let mut c = Cursor { rest: data };
    let list = c.u16("a truncated server_name")?;
    if list != c.rest.len() {
        return Err(SniError::Malformed(
            "the server_name list's length does not match its extension",
        ));
    }
    let kind = c.u8("an empty server_name list")?;
    let len = c.u16("a truncated server name")?;
    let name = c.take(len, "a server name longer than its list")?;
    if !c.rest.is_empty() {
        return Err(SniError::Ambiguous("more than one server name"));
    }
    if kind != 0 {
        return Err(SniError::Malformed("a server name that is not a host name"));
    }
    let valid = !name.is_empty()
        && name.len() <= 253
        && name
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_'))
        && !name.starts_with(b".")
        && !name.ends_with(b".");
    if !valid {
        return Err(SniError::Malformed("a server name that is not a DNS name"));
    }
    Ok(String::from_utf8_lossy(name).to_ascii_lowercase())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A ClientHello body with `exts` as its extensions (`None`: no extensions block).
    fn body(exts: Option<&[(u16, Vec<u8>)]>) -> Vec<u8> {
        let mut b = vec![3, 3];
        b.extend_from_slice(&[7; 32]);
        b.push(32);
        b.extend_from_slice(&[9; 32]);
        b.extend_from_slice(&[0, 4, 0x13, 0x01, 0x13, 0x02]);
        b.extend_from_slice(&[1, 0]);
        if let Some(exts) = exts {
            let mut e = Vec::new();
            for (kind, data) in exts {
                e.extend_from_slice(&kind.to_be_bytes());
                e.extend_from_slice(&(data.len() as u16).to_be_bytes());
                e.extend_from_slice(data);
            }
            b.extend_from_slice(&(e.len() as u16).to_be_bytes());
            b.extend_from_slice(&e);
        }
        b
    }

    fn sni_ext(names: &[&str]) -> (u16, Vec<u8>) {
        let mut list = Vec::new();
        for n in names {
            list.push(0);
            list.extend_from_slice(&(n.len() as u16).to_be_bytes());
            list.extend_from_slice(n.as_bytes());
        }
        let mut d = (list.len() as u16).to_be_bytes().to_vec();
        d.extend_from_slice(&list);
        (0, d)
    }

    /// The wire bytes of a hello with body `b`, split into records of at most `chunk`.
    fn wire(b: &[u8], chunk: usize) -> Vec<u8> {
        let mut hs = vec![1];
        hs.extend_from_slice(&(b.len() as u32).to_be_bytes()[1..]);
        hs.extend_from_slice(b);
        let mut out = Vec::new();
        for part in hs.chunks(chunk.max(1)) {
            out.extend_from_slice(&[22, 3, 1]);
            out.extend_from_slice(&(part.len() as u16).to_be_bytes());
            out.extend_from_slice(part);
        }
        out
    }

    /// A typical hello for `name`, as one record.
    pub(crate) fn hello(name: &str) -> Vec<u8> {
        wire(
            &body(Some(&[sni_ext(&[name]), (10, vec![0, 2, 0, 29])])),
            16384,
        )
    }

    #[test]
    fn reads_the_name_and_exactly_the_hello() {
        let h = hello("Logs.Corp.Test");
        assert_eq!(
            parse(&h),
            Ok(Parsed::Done(Some("logs.corp.test".into()), h.len()))
        );
        let mut more = h.clone();
        more.extend_from_slice(b"\x17\x03\x03\x00\x01x");
        assert_eq!(
            parse(&more),
            Ok(Parsed::Done(Some("logs.corp.test".into()), h.len()))
        );
        let none = wire(&body(None), 16384);
        assert_eq!(parse(&none), Ok(Parsed::Done(None, none.len())));
        let no_sni = wire(&body(Some(&[(10, vec![0, 2, 0, 29])])), 16384);
        assert_eq!(parse(&no_sni), Ok(Parsed::Done(None, no_sni.len())));
    }

    #[test]
    fn a_hello_split_over_records_reads_the_same() {
        let b = body(Some(&[sni_ext(&["vault.corp.test"])]));
        for chunk in [1, 3, 40, 100] {
            let w = wire(&b, chunk);
            let got = parse(&w);
            if (b.len() + 4).div_ceil(chunk) > MAX_RECORDS {
                assert_eq!(got, Err(SniError::TooLarge), "chunk {chunk}");
            } else {
                assert_eq!(
                    got,
                    Ok(Parsed::Done(Some("vault.corp.test".into()), w.len())),
                    "chunk {chunk}"
                );
            }
        }
    }

    #[test]
    fn ambiguous_and_broken_hellos_are_refused() {
        let two_names = wire(&body(Some(&[sni_ext(&["a.test", "b.test"])])), 16384);
        assert_eq!(
            parse(&two_names),
            Err(SniError::Ambiguous("more than one server name"))
        );
        let twice = wire(
            &body(Some(&[sni_ext(&["a.test"]), sni_ext(&["b.test"])])),
            16384,
        );
        assert_eq!(
            parse(&twice),
            Err(SniError::Ambiguous("an extension appears twice"))
        );
        assert_eq!(parse(b"GET / HTTP/1.1\r\n"), Err(SniError::NotTls));
        let bad_name = wire(&body(Some(&[sni_ext(&["a b"])])), 16384);
        assert!(matches!(parse(&bad_name), Err(SniError::Malformed(_))));
        let mut huge = vec![22, 3, 1, 0, 4, 1, 0x01, 0, 0];
        huge[6] = 0x01; // declares 64 KiB
        assert_eq!(parse(&huge), Err(SniError::TooLarge));
    }

    #[tokio::test]
    async fn the_reader_leaves_what_follows_in_the_socket() {
        let h = hello("psm.corp.test");
        let mut bytes = h.clone();
        bytes.extend_from_slice(b"after");
        let mut r = &bytes[..];
        let (name, read) = read_hello(&mut r).await.unwrap();
        assert_eq!(name.as_deref(), Some("psm.corp.test"));
        assert_eq!(read, h);
        assert_eq!(r, b"after");
        let mut short = &h[..h.len() - 1];
        assert!(matches!(read_hello(&mut short).await, Err(SniError::Io(_))));
    }

    proptest! {
        #[test]
        fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
            let _ = parse(&bytes);
            let mut tls = vec![22, 3, 1];
            tls.extend_from_slice(&bytes);
            let _ = parse(&tls);
        }

        #[test]
        fn edited_hellos_never_panic(edits in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..8)) {
            let mut h = hello("logs.corp.test");
            for (at, b) in edits {
                let i = at % h.len();
                h[i] = b;
            }
            if let Ok(Parsed::Done(_, len)) = parse(&h) {
                prop_assert!(len <= h.len());
            }
        }

        #[test]
        fn every_prefix_asks_for_more(name in "[a-z]{1,20}(\\.[a-z]{1,10}){0,3}", chunk in 20usize..300) {
            let b = body(Some(&[sni_ext(&[name.as_str()])]));
            let w = wire(&b, chunk);
            prop_assume!((b.len() + 4).div_ceil(chunk) <= MAX_RECORDS);
            for cut in 0..w.len() {
                match parse(&w[..cut]) {
                    Ok(Parsed::Need(n)) => prop_assert!(cut + n <= w.len()),
                    other => prop_assert!(false, "prefix {cut}: {other:?}"),
                }
            }
            prop_assert_eq!(parse(&w), Ok(Parsed::Done(Some(name.clone()), w.len())));
        }
    }
}
