//! Little-endian primitives with bounds checked before every read.

use super::{Kind, WireError};

/// The longest prefix of `s` of at most `max` bytes that ends on a
/// character boundary (cutting inside a multibyte character would make the
/// text undecodable on the other side).
pub fn cut_at_char_boundary(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// Builds a payload.
#[derive(Debug, Default)]
pub struct Writer {
    buf: Vec<u8>,
}

impl Writer {
    pub fn new() -> Writer {
        Writer::default()
    }
    pub fn u8(&mut self, v: u8) -> &mut Self {
        self.buf.push(v);
        self
    }
    pub fn u16(&mut self, v: u16) -> &mut Self {
        self.buf.extend_from_slice(&v.to_le_bytes());
        self
    }
    pub fn u32(&mut self, v: u32) -> &mut Self {
        self.buf.extend_from_slice(&v.to_le_bytes());
        self
    }
    pub fn i64(&mut self, v: i64) -> &mut Self {
        self.buf.extend_from_slice(&v.to_le_bytes());
        self
    }
    pub fn u128(&mut self, v: u128) -> &mut Self {
        self.buf.extend_from_slice(&v.to_le_bytes());
        self
    }
    /// A byte string of at most `u16::MAX` bytes, length-prefixed.
    pub fn blob16(&mut self, v: &[u8]) -> &mut Self {
        let len = u16::try_from(v.len()).expect("blob over 64 KiB");
        self.buf.extend_from_slice(&len.to_le_bytes());
        self.buf.extend_from_slice(v);
        self
    }
    /// A byte string of at most `u32::MAX` bytes, length-prefixed.
    pub fn blob32(&mut self, v: &[u8]) -> &mut Self {
        let len = u32::try_from(v.len()).expect("blob over 4 GiB");
        self.buf.extend_from_slice(&len.to_le_bytes());
        self.buf.extend_from_slice(v);
        self
    }
    pub fn len(&self) -> usize {
        self.buf.len()
    }
    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }
    pub fn u64(&mut self, v: u64) -> &mut Self {
        self.buf.extend_from_slice(&v.to_le_bytes());
        self
    }
    pub fn bytes(&mut self, v: &[u8]) -> &mut Self {
        self.buf.extend_from_slice(v);
        self
    }
    /// A string of at most 255 bytes, length-prefixed. A longer one is cut
    /// at the last character boundary that fits (callers validate the names
    /// they send; the encoder never produces what the decoder refuses).
    pub fn short_str(&mut self, s: &str) -> &mut Self {
        let s = cut_at_char_boundary(s, u8::MAX as usize);
        self.buf.push(s.len() as u8);
        self.buf.extend_from_slice(s.as_bytes());
        self
    }
    pub fn finish(self) -> Vec<u8> {
        self.buf
    }
}

/// Reads a payload; [`Reader::finish`] refuses trailing bytes.
#[derive(Debug)]
pub struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
    kind: Kind,
}

impl<'a> Reader<'a> {
    pub fn new(kind: Kind, buf: &'a [u8]) -> Reader<'a> {
        Reader { buf, pos: 0, kind }
    }

    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], WireError> {
        let left = self.buf.len() - self.pos;
        if left < n {
            return Err(WireError::Truncated {
                what,
                needed: n - left,
            });
        }
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    pub fn u8(&mut self, what: &'static str) -> Result<u8, WireError> {
        Ok(self.take(1, what)?[0])
    }
    pub fn u16(&mut self, what: &'static str) -> Result<u16, WireError> {
        let b = self.take(2, what)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }
    pub fn u32(&mut self, what: &'static str) -> Result<u32, WireError> {
        Ok(u32::from_le_bytes(self.array::<4>(what)?))
    }
    pub fn i64(&mut self, what: &'static str) -> Result<i64, WireError> {
        Ok(i64::from_le_bytes(self.array::<8>(what)?))
    }
    pub fn u128(&mut self, what: &'static str) -> Result<u128, WireError> {
        Ok(u128::from_le_bytes(self.array::<16>(what)?))
    }
    /// A u16-length-prefixed byte string, at most `max` bytes.
    pub fn blob16(&mut self, what: &'static str, max: usize) -> Result<&'a [u8], WireError> {
        let len = self.u16(what)? as usize;
        if len > max {
            return Err(WireError::BadField {
                field: what,
                problem: format!("length {len} over the limit of {max}"),
            });
        }
        self.take(len, what)
    }
    /// A u32-length-prefixed byte string, at most `max` bytes.
    pub fn blob32(&mut self, what: &'static str, max: usize) -> Result<&'a [u8], WireError> {
        let len = self.u32(what)? as usize;
        if len > max {
            return Err(WireError::BadField {
                field: what,
                problem: format!("length {len} over the limit of {max}"),
            });
        }
        self.take(len, what)
    }
    pub fn is_done(&self) -> bool {
        self.pos == self.buf.len()
    }
    pub fn u64(&mut self, what: &'static str) -> Result<u64, WireError> {
        let mut a = [0u8; 8];
        a.copy_from_slice(self.take(8, what)?);
        Ok(u64::from_le_bytes(a))
    }
    pub fn array<const N: usize>(&mut self, what: &'static str) -> Result<[u8; N], WireError> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N, what)?);
        Ok(a)
    }
    /// A length-prefixed UTF-8 string of at most 255 bytes.
    pub fn short_str(&mut self, what: &'static str) -> Result<String, WireError> {
        let len = self.u8(what)? as usize;
        let raw = self.take(len, what)?;
        std::str::from_utf8(raw)
            .map(str::to_owned)
            .map_err(|_| WireError::BadField {
                field: what,
                problem: "not UTF-8".into(),
            })
    }
    pub fn finish(self) -> Result<(), WireError> {
        let extra = self.buf.len() - self.pos;
        if extra != 0 {
            return Err(WireError::TrailingBytes {
                kind: self.kind,
                extra,
            });
        }
        Ok(())
    }
}
