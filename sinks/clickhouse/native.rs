//! An encoder for ClickHouse's `Native` format: one block, column after column.
//!
//! Every epoch insert is sent as exactly one native block. A block states its row count up
//! front, so a body cut short (the job killed mid-send) fails to parse and inserts nothing;
//! row formats would insert the rows that arrived. One block per insert also makes the
//! server-side block, and so its deduplication hash, a pure function of the rows we send.

use bytes::{BufMut, Bytes, BytesMut};

/// The version of the blocks the jobs write: raise it with any change that makes the same
/// events encode to other bytes (a column, an order, an encoding). A re-run of an interrupted
/// epoch must write the bytes its first run wrote, so the jobs refuse to finish an epoch begun
/// under another version (it is part of the settings fingerprint in `job_runs`). A change of one
/// job's blocks only changes that job's settings instead (`Dataflow::settings`), so that the
/// other job's interrupted epochs still re-run after an upgrade.
pub const BLOCK_FORMAT: u32 = 1;

/// Builds one native block. Call a `column_*` method once per column, in table order.
#[derive(Debug)]
pub struct NativeBlock {
    buf: BytesMut,
    rows: usize,
    columns_left: usize,
}

fn put_varint(buf: &mut BytesMut, mut value: u64) {
    loop {
        let byte = (value & 0x7f) as u8;
        value >>= 7;
        if value == 0 {
            buf.put_u8(byte);
            return;
        }
        buf.put_u8(byte | 0x80);
    }
}

fn put_string(buf: &mut BytesMut, s: &[u8]) {
    put_varint(buf, s.len() as u64);
    buf.put_slice(s);
}

impl NativeBlock {
    pub fn new(columns: usize, rows: usize) -> Self {
        let mut buf = BytesMut::with_capacity(64 + rows * 16 * columns);
        put_varint(&mut buf, columns as u64);
        put_varint(&mut buf, rows as u64);
        NativeBlock { buf, rows, columns_left: columns }
    }

    fn header(&mut self, name: &str, ty: &str) {
        assert!(self.columns_left > 0, "more columns than declared");
        self.columns_left -= 1;
        put_string(&mut self.buf, name.as_bytes());
        put_string(&mut self.buf, ty.as_bytes());
    }

    fn check(&self, written: usize) {
        assert_eq!(written, self.rows, "a column must have exactly one value per row");
    }

    pub fn column_str<'a>(&mut self, name: &str, values: impl Iterator<Item = &'a str>) {
        self.header(name, "String");
        let mut n = 0;
        for v in values {
            put_string(&mut self.buf, v.as_bytes());
            n += 1;
        }
        self.check(n);
    }

    /// A `String` column of arbitrary bytes (ClickHouse strings are byte strings).
    pub fn column_bytes<'a>(&mut self, name: &str, values: impl Iterator<Item = &'a [u8]>) {
        self.header(name, "String");
        let mut n = 0;
        for v in values {
            put_string(&mut self.buf, v);
            n += 1;
        }
        self.check(n);
    }

    pub fn column_f64(&mut self, name: &str, values: impl Iterator<Item = f64>) {
        self.header(name, "Float64");
        let mut n = 0;
        for v in values {
            self.buf.put_f64_le(v);
            n += 1;
        }
        self.check(n);
    }

    pub fn column_u64(&mut self, name: &str, values: impl Iterator<Item = u64>) {
        self.header(name, "UInt64");
        let mut n = 0;
        for v in values {
            self.buf.put_u64_le(v);
            n += 1;
        }
        self.check(n);
    }

    pub fn column_u32(&mut self, name: &str, ty: &str, values: impl Iterator<Item = u32>) {
        self.header(name, ty);
        let mut n = 0;
        for v in values {
            self.buf.put_u32_le(v);
            n += 1;
        }
        self.check(n);
    }

    pub fn column_u8(&mut self, name: &str, values: impl Iterator<Item = u8>) {
        self.header(name, "UInt8");
        let mut n = 0;
        for v in values {
            self.buf.put_u8(v);
            n += 1;
        }
        self.check(n);
    }

    pub fn column_u16(&mut self, name: &str, ty: &str, values: impl Iterator<Item = u16>) {
        self.header(name, ty);
        let mut n = 0;
        for v in values {
            self.buf.put_u16_le(v);
            n += 1;
        }
        self.check(n);
    }

    /// An `Array(UInt16)` column: the arrays' end offsets (cumulative, one per row), then all
    /// their elements.
    pub fn column_u16_arrays<'a>(&mut self, name: &str, values: impl Iterator<Item = &'a [u16]> + Clone) {
        self.header(name, "Array(UInt16)");
        let (mut n, mut end) = (0, 0u64);
        for v in values.clone() {
            end += v.len() as u64;
            self.buf.put_u64_le(end);
            n += 1;
        }
        self.check(n);
        for v in values {
            for &x in v {
                self.buf.put_u16_le(x);
            }
        }
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn finish(self) -> Bytes {
        assert_eq!(self.columns_left, 0, "fewer columns than declared");
        self.buf.freeze()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_the_layout_clickhouse_sends() {
        // What ClickHouse answers to `SELECT 'ab' AS s, toUInt64(5) AS c FORMAT Native`.
        let mut block = NativeBlock::new(2, 1);
        block.column_str("s", ["ab"].into_iter());
        block.column_u64("c", [5].into_iter());
        let expected: &[u8] = b"\x02\x01\x01s\x06String\x02ab\x01c\x06UInt64\x05\0\0\0\0\0\0\0";
        assert_eq!(&block.finish()[..], expected);
    }

    #[test]
    fn encodes_arrays_as_clickhouse_sends_them() {
        // What ClickHouse answers to `SELECT if(number = 0, [toUInt16(1), toUInt16(2)],
        // emptyArrayUInt16()) AS a FROM system.numbers LIMIT 2 FORMAT Native`: the end offsets,
        // then the elements.
        let mut block = NativeBlock::new(1, 2);
        block.column_u16_arrays("a", [&[1u16, 2][..], &[][..]].into_iter());
        let expected: &[u8] = b"\x01\x02\x01a\x0dArray(UInt16)\x02\0\0\0\0\0\0\0\x02\0\0\0\0\0\0\0\x01\0\x02\0";
        assert_eq!(&block.finish()[..], expected);
    }

    #[test]
    fn varints_span_bytes() {
        let mut buf = BytesMut::new();
        put_varint(&mut buf, 300);
        assert_eq!(&buf[..], &[0xac, 0x02]);
    }
}
