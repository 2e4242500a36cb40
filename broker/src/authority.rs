//! Accepting any `:authority` on the Unix socket.
//!
//! grpc-core clients (Python `grpcio`, C++, Ruby, ...) on a `unix:` target
//! send the socket path, percent-encoded, as `:authority`
//! (`tmp%2Fx%2Fbubbled.sock`). The HTTP/2 stack under tonic parses it as a
//! URI authority, where `%` is not allowed, and resets the stream
//! (PROTOCOL_ERROR). The broker never uses the authority (a parent is its
//! peer uid), so on the Unix socket this reader sits between the socket and
//! the HTTP/2 server and rewrites an invalid authority to `localhost`.
//!
//! It reads the client's frames: the connection's first header block is
//! decoded (HPACK); if its authority is valid (every Rust client) the rest
//! of the connection passes through untouched. Otherwise every header
//! block of the connection is decoded and re-encoded with the authority
//! fixed, without Huffman coding and, after a dynamic table size update to
//! 0 at the first re-encoded block, without the dynamic table, so the
//! server's decoder never depends on the client's table. Anything it
//! cannot parse passes through unchanged, for the HTTP/2 server to refuse.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, ReadBuf};

/// The client connection preface.
const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const FRAME_HEADER: usize = 9;
const HEADERS: u8 = 0x1;
const CONTINUATION: u8 = 0x9;
const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const PADDED: u8 = 0x8;
const PRIORITY: u8 = 0x20;
/// The largest frame the broker's HTTP/2 server accepts by default.
const MAX_FRAME: usize = 16_384;
/// A header block larger than this is passed through for the server to
/// judge (its own limits are smaller).
const MAX_BLOCK: usize = 256 << 10;
/// The authority put in place of an invalid one.
const LOCALHOST: &[u8] = b"localhost";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    /// Waiting for the preface.
    Preface,
    /// Waiting for the first header block.
    Undecided,
    /// Every header block is re-encoded.
    Rewrite,
    /// Bytes pass unchanged.
    Passthrough,
}

/// A header block being collected (HEADERS then CONTINUATION frames).
#[derive(Default)]
struct Block {
    stream: u32,
    end_stream: bool,
    fragment: Vec<u8>,
    raw: Vec<u8>,
}

/// The frame-level rewriter, independent of I/O.
pub struct Rewriter {
    mode: Mode,
    input: Vec<u8>,
    block: Option<Block>,
    decoder: loona_hpack::Decoder<'static>,
    encoder: loona_hpack::Encoder<'static>,
    table_zeroed: bool,
}

impl Default for Rewriter {
    fn default() -> Self {
        let mut decoder = loona_hpack::Decoder::new();
        decoder.set_max_allowed_table_size(4096);
        let mut encoder = loona_hpack::Encoder::new();
        encoder.set_max_table_size(0);
        Self {
            mode: Mode::Preface,
            input: Vec::new(),
            block: None,
            decoder,
            encoder,
            table_zeroed: false,
        }
    }
}

fn valid_authority(v: &[u8]) -> bool {
    tonic::codegen::http::uri::Authority::try_from(v).is_ok()
}

impl Rewriter {
    /// Whether bytes pass unchanged from now on.
    pub fn passthrough(&self) -> bool {
        self.mode == Mode::Passthrough && self.input.is_empty()
    }

    /// Feeds bytes read from the client; appends what the server should
    /// read to `out`.
    pub fn feed(&mut self, bytes: &[u8], out: &mut Vec<u8>) {
        if self.mode == Mode::Passthrough {
            out.extend_from_slice(bytes);
            return;
        }
        self.input.extend_from_slice(bytes);
        if self.mode == Mode::Preface {
            if self.input.len() < PREFACE.len() {
                return;
            }
            out.extend(self.input.drain(..PREFACE.len()));
            self.mode = Mode::Undecided;
        }
        // Frames are taken from `at` on and the consumed prefix is removed
        // once, so many small frames in one read cost no repeated shifts.
        let mut at = 0;
        loop {
            if self.mode == Mode::Passthrough {
                out.extend_from_slice(self.input.get(at..).unwrap_or(&[]));
                self.input.clear();
                return;
            }
            let Some(h) = self.input.get(at..at + FRAME_HEADER) else {
                break;
            };
            let len = (usize::from(h[0]) << 16) | (usize::from(h[1]) << 8) | usize::from(h[2]);
            let (kind, flags) = (h[3], h[4]);
            let stream = u32::from_be_bytes([h[5], h[6], h[7], h[8]]) & 0x7fff_ffff;
            if len > MAX_FRAME {
                // Larger than the server accepts: never buffer it (a
                // client announcing 16 MiB would pin that much memory);
                // pass everything through and let the server refuse it.
                if let Some(b) = self.block.take() {
                    out.extend_from_slice(&b.raw);
                }
                self.mode = Mode::Passthrough;
                continue;
            }
            let Some(frame) = self.input.get(at..at + FRAME_HEADER + len) else {
                break;
            };
            let frame = frame.to_vec();
            at += FRAME_HEADER + len;
            self.frame(kind, flags, stream, frame, out);
        }
        self.input.drain(..at);
    }

    fn frame(&mut self, kind: u8, flags: u8, stream: u32, frame: Vec<u8>, out: &mut Vec<u8>) {
        let payload = &frame[FRAME_HEADER..];
        let fragment = match (kind, self.block.is_some()) {
            (HEADERS, false) => {
                let mut p = payload;
                let mut pad = 0;
                if flags & PADDED != 0 {
                    let Some((&n, rest)) = p.split_first() else {
                        return self.give_up(frame, out);
                    };
                    pad = usize::from(n);
                    p = rest;
                }
                if flags & PRIORITY != 0 {
                    let Some(rest) = p.get(5..) else {
                        return self.give_up(frame, out);
                    };
                    p = rest;
                }
                let Some(f) = p
                    .get(..p.len().saturating_sub(pad))
                    .filter(|_| pad <= p.len())
                else {
                    return self.give_up(frame, out);
                };
                self.block = Some(Block {
                    stream,
                    end_stream: flags & END_STREAM != 0,
                    ..Block::default()
                });
                f.to_vec()
            }
            (CONTINUATION, true) => payload.to_vec(),
            (_, false) => {
                out.extend_from_slice(&frame);
                return;
            }
            // Anything but CONTINUATION inside a header block is a protocol
            // error for the server to see.
            (_, true) => return self.give_up(frame, out),
        };
        let Some(block) = self.block.as_mut() else {
            return;
        };
        block.fragment.extend_from_slice(&fragment);
        block.raw.extend_from_slice(&frame);
        if block.fragment.len() > MAX_BLOCK {
            return self.give_up(Vec::new(), out);
        }
        if flags & END_HEADERS != 0 {
            if let Some(b) = self.block.take() {
                self.finish(b, out);
            }
        }
    }

    /// Stops rewriting: what is held and `frame` go out unchanged.
    fn give_up(&mut self, frame: Vec<u8>, out: &mut Vec<u8>) {
        if let Some(b) = self.block.take() {
            out.extend_from_slice(&b.raw);
        }
        out.extend_from_slice(&frame);
        self.mode = Mode::Passthrough;
    }

    fn finish(&mut self, b: Block, out: &mut Vec<u8>) {
        let Ok(headers) = self.decoder.decode(&b.fragment) else {
            return self.give_up(b.raw, out);
        };
        let bad = headers
            .iter()
            .any(|(n, v)| n.as_slice() == b":authority" && !valid_authority(v));
        if self.mode == Mode::Undecided && !bad {
            out.extend_from_slice(&b.raw);
            self.mode = Mode::Passthrough;
            return;
        }
        self.mode = Mode::Rewrite;
        let mut block = Vec::new();
        if !self.table_zeroed {
            // Dynamic table size update to 0: the server's table stays
            // empty, as this encoder's does.
            block.push(0x20);
            self.table_zeroed = true;
        }
        let fixed = headers.iter().map(|(n, v)| {
            if n.as_slice() == b":authority" && !valid_authority(v) {
                (n.as_slice(), LOCALHOST)
            } else {
                (n.as_slice(), v.as_slice())
            }
        });
        block.extend(self.encoder.encode(fixed));
        let mut chunks = block.chunks(MAX_FRAME).peekable();
        let mut first = true;
        while let Some(chunk) = chunks.next() {
            let last = chunks.peek().is_none();
            let kind = if first { HEADERS } else { CONTINUATION };
            let mut flags = 0;
            if first && b.end_stream {
                flags |= END_STREAM;
            }
            if last {
                flags |= END_HEADERS;
            }
            let len = chunk.len();
            out.extend_from_slice(&[(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags]);
            out.extend_from_slice(&b.stream.to_be_bytes());
            out.extend_from_slice(chunk);
            first = false;
        }
    }
}

/// A connection whose client-to-server bytes go through a [`Rewriter`].
pub struct AuthorityFix<S> {
    inner: S,
    rewriter: Rewriter,
    out: Vec<u8>,
    out_pos: usize,
}

impl<S> AuthorityFix<S> {
    /// Wraps a freshly accepted connection.
    pub fn new(inner: S) -> Self {
        Self {
            inner,
            rewriter: Rewriter::default(),
            out: Vec::new(),
            out_pos: 0,
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for AuthorityFix<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if this.out_pos < this.out.len() {
                let n = buf.remaining().min(this.out.len() - this.out_pos);
                buf.put_slice(&this.out[this.out_pos..this.out_pos + n]);
                this.out_pos += n;
                if this.out_pos == this.out.len() {
                    this.out.clear();
                    this.out_pos = 0;
                }
                return Poll::Ready(Ok(()));
            }
            if this.rewriter.passthrough() {
                return Pin::new(&mut this.inner).poll_read(cx, buf);
            }
            let mut chunk = [0u8; 16 * 1024];
            let mut rb = ReadBuf::new(&mut chunk);
            match Pin::new(&mut this.inner).poll_read(cx, &mut rb) {
                Poll::Ready(Ok(())) if rb.filled().is_empty() => {
                    // End of stream: whatever is held goes out as it is.
                    this.out.append(&mut this.rewriter.input);
                    if this.out.is_empty() {
                        return Poll::Ready(Ok(()));
                    }
                }
                Poll::Ready(Ok(())) => this.rewriter.feed(rb.filled(), &mut this.out),
                other => return other,
            }
        }
    }
}

crate::wrap_io::delegate_write_and_connect_info!(AuthorityFix);

#[cfg(test)]
mod tests {
    use super::*;

    fn headers_frame(stream: u32, flags: u8, block: &[u8]) -> Vec<u8> {
        let len = block.len();
        let mut f = vec![
            (len >> 16) as u8,
            (len >> 8) as u8,
            len as u8,
            HEADERS,
            flags,
        ];
        f.extend_from_slice(&stream.to_be_bytes());
        f.extend_from_slice(block);
        f
    }

    fn decode_all(bytes: &[u8]) -> Vec<Vec<(Vec<u8>, Vec<u8>)>> {
        let mut d = loona_hpack::Decoder::new();
        let mut rest = &bytes[PREFACE.len()..];
        let mut out = Vec::new();
        while rest.len() >= FRAME_HEADER {
            let len =
                (usize::from(rest[0]) << 16) | (usize::from(rest[1]) << 8) | usize::from(rest[2]);
            if rest[3] == HEADERS {
                out.push(d.decode(&rest[FRAME_HEADER..FRAME_HEADER + len]).unwrap());
            }
            rest = &rest[FRAME_HEADER + len..];
        }
        out
    }

    fn client(authority: &[u8]) -> Vec<u8> {
        // A client encoder with a dynamic table, as grpc-core's.
        let mut enc = loona_hpack::Encoder::new();
        let h = |a: &'static [u8]| {
            vec![
                (&b":method"[..], &b"POST"[..]),
                (&b":path"[..], &b"/bubble.v1.Broker/Call"[..]),
                (&b":authority"[..], a),
                (&b"te"[..], &b"trailers"[..]),
            ]
        };
        let a: &'static [u8] = Box::leak(authority.to_vec().into_boxed_slice());
        let mut wire = PREFACE.to_vec();
        // A SETTINGS frame passes untouched.
        wire.extend_from_slice(&[0, 0, 0, 4, 0, 0, 0, 0, 0]);
        wire.extend(headers_frame(1, END_HEADERS, &enc.encode(h(a))));
        wire.extend(headers_frame(
            3,
            END_HEADERS | END_STREAM,
            &enc.encode(h(a)),
        ));
        wire
    }

    #[test]
    fn an_invalid_authority_becomes_localhost_in_every_block() {
        let wire = client(b"tmp%2Fx%2Fbubbled.sock");
        // Fed in small pieces, as a socket may deliver it.
        let mut r = Rewriter::default();
        let mut out = Vec::new();
        for piece in wire.chunks(7) {
            r.feed(piece, &mut out);
        }
        let blocks = decode_all(&out);
        assert_eq!(blocks.len(), 2);
        for b in &blocks {
            let a = b.iter().find(|(n, _)| n == b":authority").unwrap();
            assert_eq!(a.1, b"localhost");
            assert!(b
                .iter()
                .any(|(n, v)| n == b":path" && v == b"/bubble.v1.Broker/Call"));
        }
        assert!(out.windows(9).any(|w| w == [0, 0, 0, 4, 0, 0, 0, 0, 0]));
    }

    #[test]
    fn a_valid_authority_passes_byte_for_byte() {
        let wire = client(b"bubbled.local");
        let mut r = Rewriter::default();
        let mut out = Vec::new();
        r.feed(&wire, &mut out);
        assert_eq!(out, wire);
        assert!(r.passthrough());
    }

    #[test]
    fn garbage_passes_unchanged() {
        let mut wire = PREFACE.to_vec();
        wire.extend(headers_frame(1, END_HEADERS, &[0xff, 0xff, 0xff]));
        let mut r = Rewriter::default();
        let mut out = Vec::new();
        r.feed(&wire, &mut out);
        assert_eq!(out, wire);
    }

    #[test]
    fn an_oversized_frame_is_never_buffered() {
        // A frame header announcing 16 MiB, then its first bytes: the
        // rewriter passes them on at once instead of waiting for the rest.
        let mut wire = PREFACE.to_vec();
        wire.extend_from_slice(&[0xff, 0xff, 0xff, 0, 0, 0, 0, 0, 1]);
        wire.extend_from_slice(&[7u8; 4096]);
        let mut r = Rewriter::default();
        let mut out = Vec::new();
        r.feed(&wire, &mut out);
        assert_eq!(out, wire);
        assert!(r.passthrough());
        let mut more = Vec::new();
        r.feed(&[1, 2, 3], &mut more);
        assert_eq!(more, [1, 2, 3]);
    }
}
