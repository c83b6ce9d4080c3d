//! HTTP/2 floods (rapid reset, CONTINUATION, SETTINGS, PING, too many streams, oversized
//! header lists, an HPACK bomb): the flooding connection is ended (or, for oversized
//! header lists, each request refused), and other clients stay served.
//!
//! The attacker speaks raw HTTP/2 frames over plain TCP (h2c prior knowledge), written by
//! the small encoder below, so nothing between the test and keyway smooths the attack
//! over. Every flood is bounded in frames and in time. What each test expects is what h2
//! really does (see docs/http2-limits.md): GOAWAY(ENHANCE_YOUR_CALM) for the counted
//! abuses, back-pressure and then the idle timeout for floods of frames h2 must answer.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use keyway_tests::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::OwnedWriteHalf;
use tokio::net::TcpStream;
use tokio::time::Instant;

// === a raw HTTP/2 frame encoder ===

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

const HEADERS: u8 = 0x1;
const RST_STREAM: u8 = 0x3;
const SETTINGS: u8 = 0x4;
const PING: u8 = 0x6;
const GOAWAY: u8 = 0x7;
const CONTINUATION: u8 = 0x9;

const END_STREAM: u8 = 0x1;
const ACK: u8 = 0x1;
const END_HEADERS: u8 = 0x4;

const CANCEL: u32 = 0x8;
const REFUSED_STREAM: u32 = 0x7;
const ENHANCE_YOUR_CALM: u32 = 0xb;

/// One frame: 9-byte header (24-bit length, type, flags, 31-bit stream id) + payload.
fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = u32::try_from(payload.len()).expect("frame length");
    assert!(len < 1 << 24, "frame payload too long");
    let mut f = Vec::with_capacity(9 + payload.len());
    f.extend_from_slice(&len.to_be_bytes()[1..]);
    f.push(kind);
    f.push(flags);
    f.extend_from_slice(&(stream & 0x7fff_ffff).to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// HPACK integer with an `n`-bit prefix (RFC 7541 §5.1); `first` holds the high bits.
fn hpack_int(out: &mut Vec<u8>, first: u8, n: u32, mut value: usize) {
    let max = (1usize << n) - 1;
    if value < max {
        out.push(first | value as u8);
        return;
    }
    out.push(first | max as u8);
    value -= max;
    while value >= 128 {
        out.push((value % 128) as u8 | 0x80);
        value /= 128;
    }
    out.push(value as u8);
}

/// A header as "literal without indexing, new name", plain (not Huffman) strings.
fn hpack_literal(out: &mut Vec<u8>, name: &str, value: &str) {
    out.push(0x00);
    hpack_int(out, 0, 7, name.len());
    out.extend_from_slice(name.as_bytes());
    hpack_int(out, 0, 7, value.len());
    out.extend_from_slice(value.as_bytes());
}

/// Just enough of an HPACK decoder (RFC 7541) to read the `:status` of keyway's
/// responses: indexed and literal fields, the dynamic table, and Huffman-coded values
/// made of digits (h2 Huffman-codes every string). Anything else is `None`.
#[derive(Default)]
struct StatusDecoder {
    /// The dynamic table, newest first.
    dynamic: std::collections::VecDeque<(String, String)>,
}

impl StatusDecoder {
    /// The `:status` field of one header block.
    fn status(&mut self, block: &[u8]) -> Option<u16> {
        let mut status = None;
        let mut at = 0;
        while at < block.len() {
            let b = block[at];
            let (name, value) = if b & 0x80 != 0 {
                let i = hpack_read_int(block, &mut at, 7)?;
                self.entry(i)?
            } else if b & 0xe0 == 0x20 {
                // Dynamic table size update: the encoder evicts; keep it simple.
                let size = hpack_read_int(block, &mut at, 5)?;
                if size == 0 {
                    self.dynamic.clear();
                }
                continue;
            } else {
                let (prefix, index) = if b & 0x40 != 0 { (6, true) } else { (4, false) };
                let i = hpack_read_int(block, &mut at, prefix)?;
                let name = if i == 0 {
                    hpack_read_str(block, &mut at)?
                } else {
                    self.entry(i)?.0
                };
                let value = hpack_read_str(block, &mut at)?;
                if index {
                    self.dynamic.push_front((name.clone(), value.clone()));
                }
                (name, value)
            };
            if name == ":status" {
                status = value.parse().ok();
            }
        }
        status
    }

    fn entry(&self, i: usize) -> Option<(String, String)> {
        const STATUS: [&str; 7] = ["200", "204", "206", "304", "400", "404", "500"];
        match i {
            8..=14 => Some((":status".into(), STATUS[i - 8].into())),
            1..=61 => Some((format!("static-{i}"), String::new())),
            _ => self.dynamic.get(i.checked_sub(62)?).cloned(),
        }
    }
}

/// An HPACK integer with an `n`-bit prefix at `block[*at]`.
fn hpack_read_int(block: &[u8], at: &mut usize, n: u32) -> Option<usize> {
    let max = (1usize << n) - 1;
    let mut v = usize::from(*block.get(*at)?) & max;
    *at += 1;
    if v < max {
        return Some(v);
    }
    let mut shift = 0;
    loop {
        let b = *block.get(*at)?;
        *at += 1;
        v += usize::from(b & 0x7f) << shift;
        shift += 7;
        if b & 0x80 == 0 || shift > 28 {
            return Some(v);
        }
    }
}

/// An HPACK string: plain, or Huffman-coded digits.
fn hpack_read_str(block: &[u8], at: &mut usize) -> Option<String> {
    let huffman = *block.get(*at)? & 0x80 != 0;
    let len = hpack_read_int(block, at, 7)?;
    let bytes = block.get(*at..*at + len)?;
    *at += len;
    if !huffman {
        return Some(String::from_utf8_lossy(bytes).into_owned());
    }
    // The codes of '0'..='9' (RFC 7541 Appendix B), as (code, bits).
    const DIGITS: [(u32, u32); 10] = [
        (0x0, 5),
        (0x1, 5),
        (0x2, 5),
        (0x19, 6),
        (0x1a, 6),
        (0x1b, 6),
        (0x1c, 6),
        (0x1d, 6),
        (0x1e, 6),
        (0x1f, 6),
    ];
    let (mut out, mut code, mut bits) = (String::new(), 0u32, 0u32);
    for byte in bytes {
        for k in (0..8).rev() {
            code = code << 1 | u32::from(byte >> k & 1);
            bits += 1;
            if let Some(d) = DIGITS.iter().position(|&(c, b)| (c, b) == (code, bits)) {
                out.push(char::from(b'0' + d as u8));
                (code, bits) = (0, 0);
            } else if bits >= 8 {
                return None; // not a digit
            }
        }
    }
    // What is left must be padding: fewer than 8 bits, all ones.
    (code == (1 << bits) - 1).then_some(out)
}

/// The header block of `GET /` for `host`, plus `extra` headers.
fn request_block(extra: &[(&str, &str)]) -> Vec<u8> {
    let mut b = Vec::new();
    hpack_literal(&mut b, ":method", "GET");
    hpack_literal(&mut b, ":scheme", "http");
    hpack_literal(&mut b, ":path", "/");
    hpack_literal(&mut b, ":authority", "pvwa.corp.test");
    for (n, v) in extra {
        hpack_literal(&mut b, n, v);
    }
    b
}

// === the attacker's connection ===

/// What the attacker's connection received from keyway.
#[derive(Debug, Default)]
struct Observed {
    /// GOAWAY error code and debug data.
    goaway: Option<(u32, String)>,
    /// The GOAWAY's last stream id: the highest stream keyway processed.
    goaway_last_stream: Option<u32>,
    /// RST_STREAM error codes received, in order.
    resets: Vec<u32>,
    /// HEADERS frames received (responses).
    responses: usize,
    /// The `:status` of each response, decoded from its HPACK block (`None`: none found).
    statuses: Vec<Option<u16>>,
    /// PING acknowledgements received.
    pongs: usize,
    /// SETTINGS acknowledgements received.
    settings_acks: usize,
    /// Bytes received in all.
    bytes: usize,
    /// The connection ended (EOF or reset).
    closed: bool,
}

struct Attacker {
    write: OwnedWriteHalf,
    read: Option<tokio::net::tcp::OwnedReadHalf>,
    seen: Arc<Mutex<Observed>>,
}

impl Attacker {
    /// Connects, sends the preface, an empty SETTINGS and an ACK of keyway's SETTINGS
    /// (which keyway sends first, whatever the client does).
    async fn connect(addr: SocketAddr) -> Self {
        let stream = TcpStream::connect(addr).await.expect("connect");
        let (read, mut write) = stream.into_split();
        let mut hello = PREFACE.to_vec();
        hello.extend(frame(SETTINGS, 0, 0, &[]));
        hello.extend(frame(SETTINGS, ACK, 0, &[]));
        write.write_all(&hello).await.expect("preface");
        Self {
            write,
            read: Some(read),
            seen: Arc::new(Mutex::new(Observed::default())),
        }
    }

    /// Starts reading (and decoding) what keyway sends, until the connection ends.
    fn start_reading(&mut self) {
        let Some(mut read) = self.read.take() else {
            return;
        };
        let seen = self.seen.clone();
        tokio::spawn(async move {
            let mut hpack = StatusDecoder::default();
            let mut buf = Vec::new();
            let mut chunk = vec![0u8; 64 * 1024];
            loop {
                let n = match read.read(&mut chunk).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => n,
                };
                buf.extend_from_slice(&chunk[..n]);
                let mut seen = seen.lock().unwrap();
                seen.bytes += n;
                while buf.len() >= 9 {
                    let len = u32::from_be_bytes([0, buf[0], buf[1], buf[2]]) as usize;
                    if buf.len() < 9 + len {
                        break;
                    }
                    let (kind, flags) = (buf[3], buf[4]);
                    let payload = &buf[9..9 + len];
                    match kind {
                        GOAWAY if len >= 8 => {
                            let code = u32::from_be_bytes(payload[4..8].try_into().unwrap());
                            let debug = String::from_utf8_lossy(&payload[8..]).into_owned();
                            seen.goaway = Some((code, debug));
                            seen.goaway_last_stream = Some(
                                u32::from_be_bytes(payload[..4].try_into().unwrap()) & 0x7fff_ffff,
                            );
                        }
                        RST_STREAM if len == 4 => {
                            seen.resets
                                .push(u32::from_be_bytes(payload.try_into().unwrap()));
                        }
                        HEADERS => {
                            seen.responses += 1;
                            // keyway's responses are small: one frame, no padding or
                            // priority.
                            let status = hpack.status(payload);
                            seen.statuses.push(status);
                        }
                        PING if flags & ACK != 0 => seen.pongs += 1,
                        SETTINGS if flags & ACK != 0 => seen.settings_acks += 1,
                        _ => {}
                    }
                    buf.drain(..9 + len);
                }
            }
            seen.lock().unwrap().closed = true;
        });
    }

    /// Writes `bytes`; `false` when keyway stopped taking them for `stall` (back-pressure)
    /// or the connection is gone.
    async fn send(&mut self, bytes: &[u8], stall: Duration) -> bool {
        matches!(
            tokio::time::timeout(stall, self.write.write_all(bytes)).await,
            Ok(Ok(()))
        )
    }

    /// Waits (bounded) until the connection ended; returns what was observed.
    async fn wait_closed(&mut self, within: Duration) -> Observed {
        self.start_reading();
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if self.seen.lock().unwrap().closed {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        std::mem::take(&mut *self.seen.lock().unwrap())
    }
}

// === the set-up every test shares ===

/// keyway in front of one backend, with a short idle timeout so that a connection that
/// stops moving bytes is closed within the test's bounds.
async fn start() -> (TestBackend, Proxy) {
    let backend = TestBackend::start("a").await;
    let proxy = Proxy::start(&one_backend(r#"idle_timeout = "1s""#, backend.addr)).await;
    (backend, proxy)
}

/// A well-behaved HTTP/2 client and an HTTP/1.1 client on their own connections get
/// their answers (bounded in time).
async fn others_are_served(addr: SocketAddr) {
    let both = async {
        let h2 = h2_get(addr, "pvwa.corp.test", "/ok-h2").await;
        let h1 = get(addr, "pvwa.corp.test", "/ok-h1").await;
        (h2.status.as_u16(), h1.status.as_u16())
    };
    let (h2, h1) = tokio::time::timeout(Duration::from_secs(10), both)
        .await
        .expect("a well-behaved client waited more than 10 s during a flood");
    assert_eq!((h2, h1), (200, 200), "well-behaved clients are served");
}

/// Requests of the well-behaved clients that reached the backend.
fn good_hits(backend: &TestBackend) -> usize {
    backend
        .seen()
        .iter()
        .filter(|s| s.path.starts_with("/ok-"))
        .count()
}

/// Requests that reached the backend from anyone else (the attacker).
fn attacker_hits(backend: &TestBackend) -> usize {
    backend.hits() - good_hits(backend)
}

/// Floods `batch` (written `times` times) while a well-behaved client is served
/// mid-flood; stops at the first stall or write error. Returns batches written.
async fn flood(attacker: &mut Attacker, addr: SocketAddr, batch: &[u8], times: usize) -> usize {
    let started = Instant::now();
    let mut written = 0;
    for i in 0..times {
        if started.elapsed() > Duration::from_secs(10)
            || !attacker.send(batch, Duration::from_secs(2)).await
        {
            break;
        }
        written += 1;
        if i == times / 2 {
            others_are_served(addr).await;
        }
    }
    written
}

// === the floods ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rapid_reset_ends_the_connection() {
    let (backend, proxy) = start().await;
    let mut attacker = Attacker::connect(proxy.addr).await;
    attacker.start_reading();
    // HEADERS then RST_STREAM(CANCEL), 50 streams per write: the CVE-2023-44487 pattern.
    let block = request_block(&[]);
    let mut stream = 1u32;
    let mut batches = 0;
    for _ in 0..200 {
        let mut batch = Vec::new();
        for _ in 0..50 {
            batch.extend(frame(HEADERS, END_HEADERS | END_STREAM, stream, &block));
            batch.extend(frame(RST_STREAM, 0, stream, &CANCEL.to_be_bytes()));
            stream += 2;
        }
        if !attacker.send(&batch, Duration::from_secs(2)).await {
            break;
        }
        batches += 1;
        if attacker.seen.lock().unwrap().closed {
            break;
        }
    }
    others_are_served(proxy.addr).await;
    let seen = attacker.wait_closed(Duration::from_secs(5)).await;
    assert!(seen.closed, "the flooding connection stays open: {seen:?}");
    let (code, debug) = seen.goaway.clone().expect("GOAWAY before close");
    assert_eq!(code, ENHANCE_YOUR_CALM, "{seen:?}");
    assert_eq!(debug, "too_many_resets");
    // Not every stream was taken: keyway stopped processing long before the last one
    // (how many batches the kernel buffered before the close says nothing about that).
    let last = seen.goaway_last_stream.expect("GOAWAY's last stream");
    println!("{batches} batches written; the GOAWAY's last stream id: {last}");
    assert!(
        last < 2_000,
        "streams up to id {last} of 20 000 were taken ({batches} batches written)"
    );
    // Far fewer requests than streams reached the backend.
    assert!(
        attacker_hits(&backend) < 1000,
        "{}",
        attacker_hits(&backend)
    );
    others_are_served(proxy.addr).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn continuation_flood_ends_the_connection() {
    let (backend, proxy) = start().await;
    let mut attacker = Attacker::connect(proxy.addr).await;
    attacker.start_reading();
    // A header block that never ends: HEADERS without END_HEADERS, then CONTINUATION
    // frames, each carrying one more small header, never with END_HEADERS.
    let opening = frame(HEADERS, 0, 1, &request_block(&[]));
    assert!(attacker.send(&opening, Duration::from_secs(2)).await);
    let mut more = Vec::new();
    hpack_literal(&mut more, "x-pad", &"p".repeat(64));
    let batch: Vec<u8> = (0..100)
        .flat_map(|_| frame(CONTINUATION, 0, 1, &more))
        .collect();
    let written = flood(&mut attacker, proxy.addr, &batch, 100).await;
    let seen = attacker.wait_closed(Duration::from_secs(5)).await;
    assert!(seen.closed, "the flooding connection stays open: {seen:?}");
    assert_eq!(
        seen.goaway,
        Some((ENHANCE_YOUR_CALM, "too_many_continuations".into())),
        "{seen:?}"
    );
    assert!(written < 100, "all 10 000 CONTINUATION frames were taken");
    assert_eq!(attacker_hits(&backend), 0);
    others_are_served(proxy.addr).await;
}

/// SETTINGS and PING must each be answered; h2 keeps at most one answer pending and
/// reads nothing more until it is written. So a flooder that does not read is
/// back-pressured (its writes stall), then nothing moves, and keyway's idle timeout
/// closes the connection.
async fn answered_frame_flood(one: Vec<u8>, answers: fn(&Observed) -> usize) {
    let (backend, proxy) = start().await;
    let mut attacker = Attacker::connect(proxy.addr).await;
    // Not reading: keyway's answers pile up until it stops reading too.
    let batch: Vec<u8> = (0..1000).flat_map(|_| one.clone()).collect();
    let started = Instant::now();
    let written = flood(&mut attacker, proxy.addr, &batch, 5_000).await;
    assert!(
        written < 5_000,
        "keyway took all {} MB of frames without back-pressure",
        (batch.len() * 5_000) >> 20
    );
    let seen = attacker.wait_closed(Duration::from_secs(10)).await;
    assert!(seen.closed, "the stalled flooder stays connected: {seen:?}");
    assert!(answers(&seen) > 1, "the flood was not answered: {seen:?}");
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(attacker_hits(&backend), 0);
    others_are_served(proxy.addr).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn settings_flood_is_back_pressured_then_closed() {
    // SETTINGS_HEADER_TABLE_SIZE = 4096: a real setting, applied and acknowledged.
    let mut setting = vec![0x00, 0x01];
    setting.extend_from_slice(&4096u32.to_be_bytes());
    answered_frame_flood(frame(SETTINGS, 0, 0, &setting), |s| s.settings_acks).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ping_flood_is_back_pressured_then_closed() {
    answered_frame_flood(frame(PING, 0, 0, b"floodpng"), |s| s.pongs).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn too_many_concurrent_streams_are_refused_then_the_connection_ends() {
    let (backend, proxy) = start().await;
    let mut attacker = Attacker::connect(proxy.addr).await;
    attacker.start_reading();
    // Requests whose bodies never come (no END_STREAM): each stream stays open.
    let block = request_block(&[("content-length", "10")]);
    let mut stream = 1u32;
    let mut sent = 0;
    for _ in 0..20 {
        let mut batch = Vec::new();
        for _ in 0..50 {
            batch.extend(frame(HEADERS, END_HEADERS, stream, &block));
            stream += 2;
        }
        if !attacker.send(&batch, Duration::from_secs(2)).await {
            break;
        }
        sent += 50;
        // Let the first streams be accepted before the next batch arrives.
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    others_are_served(proxy.addr).await;
    let seen = attacker.wait_closed(Duration::from_secs(5)).await;
    let refused = seen.resets.iter().filter(|&&r| r == REFUSED_STREAM).count();
    assert!(refused > 0, "no stream refused after {sent}: {seen:?}");
    assert!(seen.closed, "the flooding connection stays open: {seen:?}");
    assert_eq!(
        seen.goaway,
        Some((ENHANCE_YOUR_CALM, "too_many_internal_resets".into())),
        "{seen:?}"
    );
    // Only the streams within the limit could reach the backend.
    assert!(
        attacker_hits(&backend) <= keyway_proxy::config::H2_MAX_CONCURRENT_STREAMS as usize,
        "{}",
        attacker_hits(&backend)
    );
    others_are_served(proxy.addr).await;
}

/// The frames of one request whose header block is `block`, split into 16 KiB frames.
fn request_frames(stream: u32, block: &[u8]) -> Vec<u8> {
    let mut frames = Vec::new();
    let mut chunks = block.chunks(16 * 1024).peekable();
    let mut first = true;
    while let Some(chunk) = chunks.next() {
        let kind = if first { HEADERS } else { CONTINUATION };
        let mut flags = if chunks.peek().is_none() {
            END_HEADERS
        } else {
            0
        };
        if first {
            flags |= END_STREAM;
        }
        frames.extend(frame(kind, flags, stream, chunk));
        first = false;
    }
    frames
}

/// A header list above the limit is answered 431 on its stream (h2 does not count these
/// towards any connection limit, so the connection lives on until idle) and never
/// reaches the backend.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_header_lists_get_431_and_never_reach_the_backend() {
    let (backend, proxy) = start().await;
    let mut attacker = Attacker::connect(proxy.addr).await;
    attacker.start_reading();
    // 70 000 bytes of header value: above the 64 KiB default limit, within the five
    // 16 KiB frames h2 lets one header block span.
    let block = request_block(&[("x-big", &"v".repeat(70_000))]);
    let mut sent = 0;
    for stream in (1u32..).step_by(2).take(400) {
        if !attacker
            .send(&request_frames(stream, &block), Duration::from_secs(2))
            .await
        {
            break;
        }
        sent += 1;
        if sent == 200 {
            others_are_served(proxy.addr).await;
        }
    }
    assert_eq!(sent, 400, "keyway stopped reading the oversized requests");
    // Then nothing moves: the idle timeout ends the connection with GOAWAY(NO_ERROR).
    let seen = attacker.wait_closed(Duration::from_secs(10)).await;
    assert_eq!(
        seen.statuses,
        vec![Some(431); sent],
        "one 431 per oversized request: {seen:?}"
    );
    assert!(seen.closed, "{seen:?}");
    assert_eq!(seen.goaway, Some((0, String::new())), "{seen:?}");
    assert_eq!(
        attacker_hits(&backend),
        0,
        "an oversized request reached the backend"
    );
    others_are_served(proxy.addr).await;
}

/// An HPACK bomb: one 4 000-byte header put in the dynamic table, then referenced by its
/// one-byte index 100 times: 400 kB decoded from 4 kB sent. Past four times the header
/// list limit h2 stops decoding and ends the connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hpack_bomb_ends_the_connection() {
    let (backend, proxy) = start().await;
    let mut attacker = Attacker::connect(proxy.addr).await;
    attacker.start_reading();
    let mut block = request_block(&[]);
    // Literal with incremental indexing, new name: lands at dynamic index 62.
    block.push(0x40);
    hpack_int(&mut block, 0, 7, 3);
    block.extend_from_slice(b"x-b");
    hpack_int(&mut block, 0, 7, 4000);
    block.extend(std::iter::repeat_n(b'b', 4000));
    block.extend(std::iter::repeat_n(0x80 | 62, 100));
    assert!(
        attacker
            .send(&request_frames(1, &block), Duration::from_secs(2))
            .await
    );
    others_are_served(proxy.addr).await;
    let seen = attacker.wait_closed(Duration::from_secs(5)).await;
    assert!(seen.closed, "{seen:?}");
    assert_eq!(
        seen.goaway,
        Some((ENHANCE_YOUR_CALM, "header_list_way_too_large".into())),
        "{seen:?}"
    );
    assert_eq!(attacker_hits(&backend), 0);
    others_are_served(proxy.addr).await;
}
