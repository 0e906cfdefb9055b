//! JSON as QEMU's monitor reads and writes it.
//!
//! Reading: a byte-stream splitter that behaves like QEMU's JSON streamer, observed on
//! qemu-storage-daemon 10.0: single-quoted strings are accepted; a lexical error ("stray")
//! drops what was pending and skips input up to a structural character, an ASCII control
//! character other than tab, or a 0xFE/0xFF byte; a value is parsed once its braces and
//! brackets balance (or go negative); and pending input is capped (64 MiB, 2 Mi tokens,
//! nesting 1024) so that a peer cannot make the daemon buffer without bound.
//!
//! Writing is `qapi::json`'s, shared with the block layer's `json:` filenames.

use serde_json::{Map, Number, Value};

const MAX_TOKEN_SIZE: usize = 64 << 20;
const MAX_TOKEN_COUNT: usize = 2 << 20;
const MAX_NESTING: i64 = 1024;
/// Letters of a keyword kept for its error message.
const MAX_KEYWORD: usize = 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TokenKind {
    LCurly,
    RCurly,
    LSquare,
    RSquare,
    Colon,
    Comma,
    String,
    Integer,
    Float,
    Keyword,
}

/// A pending token: its kind and where its bytes are in [`Streamer::text`]. Kept small
/// because a peer may make us hold two million of them.
#[derive(Debug, Clone, Copy)]
struct Token {
    kind: TokenKind,
    start: u32,
    end: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum LexState {
    Start,
    Recovery,
    Str { quote: u8, escaped: bool },
    Minus,
    Zero,
    Digits,
    Dot,
    Fraction,
    Exp,
    ExpSign,
    ExpDigits,
    Keyword,
}

/// What one complete message of input gave: a value, or the `desc` of the error reply.
pub type Message = Result<Value, String>;

/// Splits a byte stream into JSON messages the way QEMU's monitor does.
pub struct Streamer {
    state: LexState,
    token: Vec<u8>,
    tokens: Vec<Token>,
    /// The bytes of all pending tokens, back to back.
    text: Vec<u8>,
    braces: i64,
    brackets: i64,
}

impl Default for Streamer {
    fn default() -> Self {
        Self::new()
    }
}

impl Streamer {
    pub fn new() -> Self {
        Streamer {
            state: LexState::Start,
            token: Vec::new(),
            tokens: Vec::new(),
            text: Vec::new(),
            braces: 0,
            brackets: 0,
        }
    }

    /// Feeds bytes; complete messages are appended to `out` in input order.
    pub fn feed(&mut self, bytes: &[u8], out: &mut Vec<Message>) {
        for &b in bytes {
            self.lex(b, out);
        }
    }

    fn lex(&mut self, b: u8, out: &mut Vec<Message>) {
        // A byte that ends a number or keyword is looked at again in the start state.
        loop {
            match self.state {
                LexState::Start => {
                    self.start(b, out);
                    return;
                }
                LexState::Recovery => {
                    let resync = matches!(b, b'{' | b'}' | b'[' | b']' | b':' | b',' | 0xFE | 0xFF)
                        || (b < 0x20 && b != b'\t');
                    if resync {
                        self.state = LexState::Start;
                        continue;
                    }
                    return;
                }
                LexState::Str { quote, escaped } => {
                    if !(0x20..0xFE).contains(&b) {
                        self.error(b, out);
                    } else if escaped {
                        self.push_byte(
                            b,
                            LexState::Str {
                                quote,
                                escaped: false,
                            },
                            out,
                        );
                    } else if b == b'\\' {
                        self.push_byte(
                            b,
                            LexState::Str {
                                quote,
                                escaped: true,
                            },
                            out,
                        );
                    } else if b == quote {
                        self.token.push(b);
                        self.emit(TokenKind::String, out);
                    } else {
                        self.push_byte(b, self.state, out);
                    }
                    return;
                }
                LexState::Minus => {
                    match b {
                        b'0' => self.push_byte(b, LexState::Zero, out),
                        b'1'..=b'9' => self.push_byte(b, LexState::Digits, out),
                        _ => self.error(b, out),
                    }
                    return;
                }
                LexState::Zero | LexState::Digits => match b {
                    b'0'..=b'9' if self.state == LexState::Zero => {
                        self.error(b, out);
                        return;
                    }
                    b'0'..=b'9' => return self.push_byte(b, LexState::Digits, out),
                    b'.' => return self.push_byte(b, LexState::Dot, out),
                    b'e' | b'E' => return self.push_byte(b, LexState::Exp, out),
                    _ => self.emit(TokenKind::Integer, out),
                },
                LexState::Dot => {
                    match b {
                        b'0'..=b'9' => self.push_byte(b, LexState::Fraction, out),
                        _ => self.error(b, out),
                    }
                    return;
                }
                LexState::Fraction => match b {
                    b'0'..=b'9' => return self.push_byte(b, LexState::Fraction, out),
                    b'e' | b'E' => return self.push_byte(b, LexState::Exp, out),
                    _ => self.emit(TokenKind::Float, out),
                },
                LexState::Exp => {
                    match b {
                        b'+' | b'-' => self.push_byte(b, LexState::ExpSign, out),
                        b'0'..=b'9' => self.push_byte(b, LexState::ExpDigits, out),
                        _ => self.error(b, out),
                    }
                    return;
                }
                LexState::ExpSign => {
                    match b {
                        b'0'..=b'9' => self.push_byte(b, LexState::ExpDigits, out),
                        _ => self.error(b, out),
                    }
                    return;
                }
                LexState::ExpDigits => match b {
                    b'0'..=b'9' => return self.push_byte(b, LexState::ExpDigits, out),
                    _ => self.emit(TokenKind::Float, out),
                },
                LexState::Keyword => match b {
                    // No keyword is longer than five letters; a longer run only shows
                    // in the error, which quotes its first MAX_KEYWORD letters (QEMU
                    // quotes it whole: a 60 MiB run came back as a 60 MiB error).
                    b'a'..=b'z' if self.token.len() >= MAX_KEYWORD => return,
                    b'a'..=b'z' => return self.push_byte(b, LexState::Keyword, out),
                    _ => self.emit(TokenKind::Keyword, out),
                },
            }
        }
    }

    fn start(&mut self, b: u8, out: &mut Vec<Message>) {
        let single = |kind| (kind, vec![b]);
        let (kind, text) = match b {
            b' ' | b'\t' | b'\r' | b'\n' => return,
            b'{' => single(TokenKind::LCurly),
            b'}' => single(TokenKind::RCurly),
            b'[' => single(TokenKind::LSquare),
            b']' => single(TokenKind::RSquare),
            b':' => single(TokenKind::Colon),
            b',' => single(TokenKind::Comma),
            b'"' | b'\'' => {
                return self.push_byte(
                    b,
                    LexState::Str {
                        quote: b,
                        escaped: false,
                    },
                    out,
                )
            }
            b'-' => return self.push_byte(b, LexState::Minus, out),
            b'0' => return self.push_byte(b, LexState::Zero, out),
            b'1'..=b'9' => return self.push_byte(b, LexState::Digits, out),
            b'a'..=b'z' => return self.push_byte(b, LexState::Keyword, out),
            _ => return self.error(b, out),
        };
        self.token = text;
        self.emit(kind, out);
    }

    /// Grows the current token; one that outgrows the cap is handed on as it is, which the
    /// streamer then refuses for its size.
    fn push_byte(&mut self, b: u8, next: LexState, out: &mut Vec<Message>) {
        // Checked before the push: a push past the cap would double the buffer to twice
        // the cap (with the old one still alive while it is copied) only to drop it.
        if self.token.len() >= MAX_TOKEN_SIZE {
            self.state = LexState::Start;
            self.token.clear();
            self.fail("JSON token size limit exceeded".into(), out);
            return;
        }
        self.token.push(b);
        self.state = next;
    }

    fn error(&mut self, b: u8, out: &mut Vec<Message>) {
        self.token.push(b);
        let text = String::from_utf8_lossy(&self.token).into_owned();
        self.token.clear();
        self.fail(format!("JSON parse error, stray '{text}'"), out);
        self.state = LexState::Recovery;
    }

    fn fail(&mut self, desc: String, out: &mut Vec<Message>) {
        self.reset();
        out.push(Err(desc));
    }

    fn reset(&mut self) {
        self.tokens.clear();
        self.text.clear();
        // Give back what a huge message took; ordinary ones stay well below this.
        const KEEP: usize = 1 << 20;
        self.text.shrink_to(KEEP);
        self.tokens.shrink_to(KEEP / std::mem::size_of::<Token>());
        self.token.shrink_to(KEEP);
        self.braces = 0;
        self.brackets = 0;
    }

    fn emit(&mut self, kind: TokenKind, out: &mut Vec<Message>) {
        self.state = LexState::Start;
        let text = std::mem::take(&mut self.token);
        match kind {
            TokenKind::LCurly => self.braces += 1,
            TokenKind::RCurly => self.braces -= 1,
            TokenKind::LSquare => self.brackets += 1,
            TokenKind::RSquare => self.brackets -= 1,
            _ => {}
        }
        if self.text.len() + text.len() + 1 > MAX_TOKEN_SIZE {
            return self.fail("JSON token size limit exceeded".into(), out);
        }
        if self.tokens.len() + 1 > MAX_TOKEN_COUNT {
            return self.fail("JSON token count limit exceeded".into(), out);
        }
        if self.braces + self.brackets > MAX_NESTING {
            return self.fail("JSON nesting depth limit exceeded".into(), out);
        }
        // Both fit in u32: the buffer never exceeds MAX_TOKEN_SIZE.
        let start = self.text.len() as u32;
        self.text.extend_from_slice(&text);
        self.token = text;
        self.token.clear();
        self.tokens.push(Token {
            kind,
            start,
            end: self.text.len() as u32,
        });
        if (self.braces > 0 || self.brackets > 0) && self.braces >= 0 && self.brackets >= 0 {
            return;
        }
        let parsed = Parser {
            tokens: &self.tokens,
            text: &self.text,
            pos: 0,
        }
        .value()
        .map_err(|e| format!("JSON parse error, {e}"));
        self.reset();
        out.push(parsed);
    }
}

struct Parser<'a> {
    tokens: &'a [Token],
    text: &'a [u8],
    pos: usize,
}

impl<'a> Parser<'a> {
    fn next(&mut self) -> Option<(TokenKind, &'a [u8])> {
        let t = self.tokens.get(self.pos)?;
        self.pos += 1;
        Some((t.kind, &self.text[t.start as usize..t.end as usize]))
    }

    fn peek_kind(&self) -> Option<TokenKind> {
        self.tokens.get(self.pos).map(|t| t.kind)
    }

    fn value(&mut self) -> Result<Value, String> {
        let Some((kind, text)) = self.next() else {
            return Err("expecting value".into());
        };
        match kind {
            TokenKind::LCurly => self.object(),
            TokenKind::LSquare => self.array(),
            TokenKind::String => decode_string(text).map(Value::String),
            TokenKind::Integer => Ok(integer(text)),
            TokenKind::Float => Ok(float(text)),
            TokenKind::Keyword => match text {
                b"true" => Ok(Value::Bool(true)),
                b"false" => Ok(Value::Bool(false)),
                b"null" => Ok(Value::Null),
                other => Err(format!(
                    "invalid keyword '{}'",
                    String::from_utf8_lossy(other)
                )),
            },
            _ => Err("expecting value".into()),
        }
    }

    fn object(&mut self) -> Result<Value, String> {
        let mut map = Map::new();
        if self.peek_kind() == Some(TokenKind::RCurly) {
            self.pos += 1;
            return Ok(Value::Object(map));
        }
        loop {
            let Value::String(key) = self.value()? else {
                return Err("key is not a string in object".into());
            };
            if self.next().map(|t| t.0) != Some(TokenKind::Colon) {
                return Err("missing : in object pair".into());
            }
            let value = self.value()?;
            if map.insert(key, value).is_some() {
                return Err("duplicate key".into());
            }
            match self.next().map(|t| t.0) {
                Some(TokenKind::Comma) => continue,
                Some(TokenKind::RCurly) => return Ok(Value::Object(map)),
                _ => return Err("expected separator in dict".into()),
            }
        }
    }

    fn array(&mut self) -> Result<Value, String> {
        let mut items = Vec::new();
        if self.peek_kind() == Some(TokenKind::RSquare) {
            self.pos += 1;
            return Ok(Value::Array(items));
        }
        loop {
            items.push(self.value()?);
            match self.next().map(|t| t.0) {
                Some(TokenKind::Comma) => continue,
                Some(TokenKind::RSquare) => return Ok(Value::Array(items)),
                _ => return Err("expected separator in list".into()),
            }
        }
    }
}

/// An integer token: int64 when it fits, else uint64, else a double, as QEMU does.
fn integer(text: &[u8]) -> Value {
    let s = std::str::from_utf8(text).unwrap_or("0");
    if let Ok(i) = s.parse::<i64>() {
        Value::from(i)
    } else if let Ok(u) = s.parse::<u64>() {
        Value::from(u)
    } else {
        float(text)
    }
}

/// A double; one too large for JSON (QEMU would print `inf`) becomes null.
fn float(text: &[u8]) -> Value {
    let f = std::str::from_utf8(text)
        .ok()
        .and_then(|s| s.parse::<f64>().ok())
        .unwrap_or(f64::NAN);
    Number::from_f64(f).map_or(Value::Null, Value::Number)
}

/// Decodes a string token (quotes included): escapes, and UTF-8 with QEMU's rules (no
/// surrogates, no noncharacters, overlong forms refused except `C0 80` for U+0000).
fn decode_string(text: &[u8]) -> Result<String, String> {
    let body = &text[1..text.len() - 1];
    let mut out = String::with_capacity(body.len());
    let mut i = 0;
    while i < body.len() {
        let b = body[i];
        if b == b'\\' {
            let Some(&e) = body.get(i + 1) else {
                return Err("invalid escape sequence in string".into());
            };
            i += 2;
            let c = match e {
                b'"' => '"',
                b'\'' => '\'',
                b'\\' => '\\',
                b'/' => '/',
                b'b' => '\u{8}',
                b'f' => '\u{c}',
                b'n' => '\n',
                b'r' => '\r',
                b't' => '\t',
                b'u' => {
                    let (c, used) = unicode_escape(&text[i + 1..])?;
                    i += used;
                    c
                }
                _ => return Err("invalid escape sequence in string".into()),
            };
            out.push(c);
        } else {
            let (c, used) = utf8_char(&body[i..]).ok_or("invalid UTF-8 sequence in string")?;
            out.push(c);
            i += used;
        }
    }
    Ok(out)
}

/// The code point of a `\u` escape whose hex digits start `rest` (which runs to the end of
/// the token, closing quote included), and the bytes it used.
fn unicode_escape(rest: &[u8]) -> Result<(char, usize), String> {
    let hex4 = |s: &[u8]| -> Option<u32> {
        let h = s.get(..4)?;
        if !h.iter().all(u8::is_ascii_hexdigit) {
            return None;
        }
        u32::from_str_radix(std::str::from_utf8(h).ok()?, 16).ok()
    };
    let invalid = |s: &[u8]| {
        let shown = &s[..s.len().min(4)];
        format!(
            "\\u{} is not a valid Unicode character",
            String::from_utf8_lossy(shown)
        )
    };
    let hi = hex4(rest).ok_or_else(|| invalid(rest))?;
    let (cp, used) = if (0xD800..0xDC00).contains(&hi) {
        let lo = rest
            .get(4..6)
            .filter(|s| *s == b"\\u")
            .and_then(|_| hex4(&rest[6..]))
            .filter(|lo| (0xDC00..0xE000).contains(lo))
            .ok_or_else(|| invalid(rest))?;
        (0x10000 + ((hi - 0xD800) << 10) + (lo - 0xDC00), 10)
    } else {
        (hi, 4)
    };
    match char::from_u32(cp) {
        Some(c) if !is_noncharacter(cp) => Ok((c, used)),
        _ => Err(invalid(rest)),
    }
}

fn is_noncharacter(cp: u32) -> bool {
    (0xFDD0..=0xFDEF).contains(&cp) || cp & 0xFFFE == 0xFFFE
}

fn utf8_char(s: &[u8]) -> Option<(char, usize)> {
    let b0 = s[0];
    if b0 < 0x80 {
        return Some((char::from(b0), 1));
    }
    if s.starts_with(&[0xC0, 0x80]) {
        return Some(('\0', 2));
    }
    let len = match b0 {
        0xC2..=0xDF => 2,
        0xE0..=0xEF => 3,
        0xF0..=0xF4 => 4,
        _ => return None,
    };
    let c = std::str::from_utf8(s.get(..len)?).ok()?.chars().next()?;
    (!is_noncharacter(u32::from(c))).then_some((c, len))
}

#[cfg(test)]
mod tests {
    use super::*;
    use qapi::json::to_string;

    fn replies(input: &[u8]) -> Vec<String> {
        let mut s = Streamer::new();
        let mut out = Vec::new();
        s.feed(input, &mut out);
        out.into_iter()
            .map(|m| match m {
                Ok(v) => to_string(&v),
                Err(e) => {
                    let wire = to_string(&Value::String(e));
                    format!("ERR {}", &wire[1..wire.len() - 1])
                }
            })
            .collect()
    }

    /// Observed on qemu-storage-daemon 10.0.2 (each input sent as one line).
    #[test]
    fn a_long_run_of_letters_is_quoted_only_in_part() {
        let mut s = Streamer::new();
        let mut out = Vec::new();
        s.feed(b"[", &mut out);
        let letters = vec![b'a'; 10 << 20];
        s.feed(&letters, &mut out);
        s.feed(b"]\n", &mut out);
        let expected = format!(
            "JSON parse error, invalid keyword '{}'",
            "a".repeat(MAX_KEYWORD)
        );
        assert_eq!(out, [Err(expected)]);
        assert!(s.token.capacity() < 1 << 20);
    }

    #[test]
    fn reader_matches_qsd() {
        let cases: &[(&[u8], &[&str])] = &[
            (
                b"garbage\n",
                &["ERR JSON parse error, invalid keyword 'garbage'"],
            ),
            (
                b"{\"execute\": xyz\n{\"execute\":\"q\"}\n}\n",
                &["ERR JSON parse error, invalid keyword 'xyz'"],
            ),
            (b"]\n", &["ERR JSON parse error, expecting value"]),
            (
                b"{\"a\":1}}\n",
                &["{\"a\": 1}", "ERR JSON parse error, expecting value"],
            ),
            (b"{\"a\":1} {\"b\":2}\n", &["{\"a\": 1}", "{\"b\": 2}"]),
            (b"'single'\n", &["\"single\""]),
            (b"{'a':'b'}\n", &["{\"a\": \"b\"}"]),
            (b"{\"a\":1", &[]),
            (b"01\n", &["ERR JSON parse error, stray '01'"]),
            (b"[-}\n", &["ERR JSON parse error, stray '-}'"]),
            (b"[1.}\n", &["ERR JSON parse error, stray '1.}'"]),
            (b"[1e}\n", &["ERR JSON parse error, stray '1e}'"]),
            (
                b"[.5}\n",
                &[
                    "ERR JSON parse error, stray '.'",
                    "ERR JSON parse error, expecting value",
                ],
            ),
            (
                b"[+1}\n",
                &[
                    "ERR JSON parse error, stray '+'",
                    "ERR JSON parse error, expecting value",
                ],
            ),
            (
                b"{\"a\":1x}\n",
                &["ERR JSON parse error, expected separator in dict"],
            ),
            (
                b"{\"a\":1.5.3}\n",
                &[
                    "ERR JSON parse error, stray '.'",
                    "ERR JSON parse error, expecting value",
                ],
            ),
            (
                b"[truex]\n",
                &["ERR JSON parse error, invalid keyword 'truex'"],
            ),
            (
                b"[true1]\n",
                &["ERR JSON parse error, expected separator in list"],
            ),
            (
                b"{\"a\":Abc def}\n",
                &[
                    "ERR JSON parse error, stray 'A'",
                    "ERR JSON parse error, expecting value",
                ],
            ),
            (
                b"{\"a\":Abc,def}\n",
                &[
                    "ERR JSON parse error, stray 'A'",
                    "ERR JSON parse error, expecting value",
                    "ERR JSON parse error, invalid keyword 'def'",
                    "ERR JSON parse error, expecting value",
                ],
            ),
            (
                b"{\"a\":Abc[def}\n",
                &[
                    "ERR JSON parse error, stray 'A'",
                    "ERR JSON parse error, invalid keyword 'def'",
                ],
            ),
            (
                b"{\"a\":Abc\tdef}\n",
                &[
                    "ERR JSON parse error, stray 'A'",
                    "ERR JSON parse error, expecting value",
                ],
            ),
            (
                b"{\"a\":Abc\x01def}\n",
                &[
                    "ERR JSON parse error, stray 'A'",
                    "ERR JSON parse error, stray '\\u0001'",
                    "ERR JSON parse error, expecting value",
                ],
            ),
            (b"\xff\n", &["ERR JSON parse error, stray '\\uFFFD'"]),
            (b"\x7f\n", &["ERR JSON parse error, stray '\\u007F'"]),
            (
                b"x\xffy\n",
                &[
                    "ERR JSON parse error, invalid keyword 'x'",
                    "ERR JSON parse error, stray '\\uFFFD'",
                ],
            ),
            (
                b"@ x\ny\n",
                &[
                    "ERR JSON parse error, stray '@'",
                    "ERR JSON parse error, invalid keyword 'y'",
                ],
            ),
            (
                b"@\xff\n",
                &[
                    "ERR JSON parse error, stray '@'",
                    "ERR JSON parse error, stray '\\uFFFD'",
                ],
            ),
            (b"@\x80y\n", &["ERR JSON parse error, stray '@'"]),
            (
                b"{\"e\":1, @ {\"id\":9}\n",
                &["ERR JSON parse error, stray '@'", "{\"id\": 9}"],
            ),
            (
                b"[\"tab\there\"]\n",
                &[
                    r#"ERR JSON parse error, stray '\"tab\t'"#,
                    "ERR JSON parse error, expecting value",
                ],
            ),
            (
                b"[\"\\\x01\"]\n",
                &[
                    r#"ERR JSON parse error, stray '\"\\\u0001'"#,
                    "ERR JSON parse error, expecting value",
                ],
            ),
            (
                b"[\"\xff\"]\n",
                &[
                    r#"ERR JSON parse error, stray '\"\uFFFD'"#,
                    "ERR JSON parse error, expecting value",
                ],
            ),
            (
                b"{\"a\" 1}\n",
                &["ERR JSON parse error, missing : in object pair"],
            ),
            (
                b"{1:2}\n",
                &["ERR JSON parse error, key is not a string in object"],
            ),
            (b"{\"a\":1,}\n", &["ERR JSON parse error, expecting value"]),
            (b"[1,]\n", &["ERR JSON parse error, expecting value"]),
            (
                b"[1 2]\n",
                &["ERR JSON parse error, expected separator in list"],
            ),
            (b"{,}\n", &["ERR JSON parse error, expecting value"]),
            (
                b"{\"a\"}\n",
                &["ERR JSON parse error, missing : in object pair"],
            ),
            (b"[}\n", &["ERR JSON parse error, expecting value"]),
            (b"{]\n", &["ERR JSON parse error, expecting value"]),
            (
                b"{\"a\":1]\n",
                &["ERR JSON parse error, expected separator in dict"],
            ),
            (
                b"[1}\n",
                &["ERR JSON parse error, expected separator in list"],
            ),
            (b"[1,,2]\n", &["ERR JSON parse error, expecting value"]),
            (
                b"{\"a\":1,\"a\":2}\n",
                &["ERR JSON parse error, duplicate key"],
            ),
            (b"1 2\n", &["1", "2"]),
            (b"[1]]\n", &["[1]", "ERR JSON parse error, expecting value"]),
            (b"  \t\r\n", &[]),
            (
                b"[\"a\\qb\"]",
                &["ERR JSON parse error, invalid escape sequence in string"],
            ),
            (
                b"[\"\\U0041\"]",
                &["ERR JSON parse error, invalid escape sequence in string"],
            ),
            (
                b"[\"a\\u12\"]",
                &[r#"ERR JSON parse error, \\u12\" is not a valid Unicode character"#],
            ),
            (
                b"[\"\\u0\"]",
                &[r#"ERR JSON parse error, \\u0\" is not a valid Unicode character"#],
            ),
            (
                b"[\"\\ud800\"]",
                &[r#"ERR JSON parse error, \\ud800 is not a valid Unicode character"#],
            ),
            (
                b"[\"\\ud800\\u0041\"]",
                &[r#"ERR JSON parse error, \\ud800 is not a valid Unicode character"#],
            ),
            (
                b"[\"\\udc00x\"]",
                &[r#"ERR JSON parse error, \\udc00 is not a valid Unicode character"#],
            ),
            (
                b"[\"\\uffff\"]",
                &[r#"ERR JSON parse error, \\uffff is not a valid Unicode character"#],
            ),
            (
                b"[\"\\ufdd0\"]",
                &[r#"ERR JSON parse error, \\ufdd0 is not a valid Unicode character"#],
            ),
            (
                b"[\"\\u00zz\"]",
                &[r#"ERR JSON parse error, \\u00zz is not a valid Unicode character"#],
            ),
            (
                b"[\"\\ud83d\\ude00\\u004A\\u0000\"]",
                &["[\"\\uD83D\\uDE00J\\u0000\"]"],
            ),
            (
                b"[\"\xc3\xa9\xf0\x9f\x98\x80\x7f\"]",
                &["[\"\\u00E9\\uD83D\\uDE00\\u007F\"]"],
            ),
            (b"[\"\xc0\x80\"]", &["[\"\\u0000\"]"]),
            (
                b"[\"\\/\\b\\f\\n\\r\\t\\\"\\\\\\'\"]",
                &["[\"/\\b\\f\\n\\r\\t\\\"\\\\'\"]"],
            ),
            (b"['a\"b\\'c']", &["[\"a\\\"b'c\"]"]),
        ];
        for (input, want) in cases {
            assert_eq!(replies(input), *want, "{}", String::from_utf8_lossy(input));
        }
        for bad in [
            &b"[\"\xc3\"]"[..],
            b"[\"\xed\xa0\x80\"]",
            b"[\"\xf4\x90\x80\x80\"]",
            b"[\"\xef\xbf\xbf\"]",
            b"[\"\xef\xbf\xbe\"]",
            b"[\"\xef\xb7\x90\"]",
            b"[\"\xf0\x9f\xbf\xbf\"]",
            b"[\"\xe0\x80\xaf\"]",
            b"[\"a\x80b\"]",
        ] {
            assert_eq!(
                replies(bad),
                ["ERR JSON parse error, invalid UTF-8 sequence in string"],
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    /// Numbers as qemu-storage-daemon echoes them back in `id`.
    #[test]
    fn numbers_match_qsd() {
        for (input, want) in [
            ("1.5e300", "1.5000000000000001e+300"),
            ("0.1", "0.10000000000000001"),
            ("12345678901234567890", "12345678901234567890"),
            ("-0", "0"),
            ("1.0", "1"),
            ("1e5", "100000"),
            ("0.5", "0.5"),
            ("123456789012345678901234", "1.2345678901234569e+23"),
            ("-9223372036854775809", "-9.2233720368547758e+18"),
            ("-9223372036854775808", "-9223372036854775808"),
            ("18446744073709551616", "1.8446744073709552e+19"),
            ("1e-7", "9.9999999999999995e-08"),
            ("123456.789", "123456.789"),
            ("1e17", "1e+17"),
            ("1e16", "10000000000000000"),
            ("0.0001", "0.0001"),
            ("-1.5", "-1.5"),
        ] {
            assert_eq!(
                replies(format!("[{input}]").as_bytes()),
                [format!("[{want}]")],
                "{input}"
            );
        }
    }

    #[test]
    fn limits_reset_the_streamer() {
        let mut input = vec![b'['; 1025];
        input.extend_from_slice(b"]\n[[1]]\n");
        assert_eq!(
            replies(&input),
            [
                "ERR JSON nesting depth limit exceeded",
                "ERR JSON parse error, expecting value",
                "[[1]]"
            ]
        );
        let mut s = Streamer::new();
        let mut out = Vec::new();
        s.feed(b"[\"", &mut out);
        let chunk = vec![b'a'; 1 << 20];
        for _ in 0..65 {
            s.feed(&chunk, &mut out);
        }
        assert_eq!(out, [Err("JSON token size limit exceeded".to_string())]);
        assert!(s.token.len() < 2 << 20 && s.tokens.is_empty() && s.text.is_empty());
    }
}
