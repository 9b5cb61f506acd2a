//! HTTP/1.1 framing for the API socket: request heads parsed by
//! `httparse`, bodies by `Content-Length`, several requests per
//! connection, responses written whole.
//!
//! Limits a client cannot get past: a head of at most [`MAX_HEAD`] bytes
//! (431), a body of at most [`MAX_BODY`] bytes (413), no chunked bodies
//! (400), and whatever read timeout the caller set on the socket.

use std::io::{self, Read, Write};

/// Largest request head (request line and headers).
pub const MAX_HEAD: usize = 16 * 1024;
/// Largest request body.
pub const MAX_BODY: usize = 1 << 20;
/// Most headers in one request.
const MAX_HEADERS: usize = 64;

/// One request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub method: String,
    pub path: String,
    pub body: Vec<u8>,
    /// The client asked to close the connection after this request.
    pub close: bool,
}

/// Why no request could be read.
#[derive(Debug)]
pub enum ReadError {
    /// The client closed the connection between requests.
    Closed,
    /// The socket's read timeout passed.
    TimedOut,
    Io(io::Error),
    /// The request is malformed or too large: answer `status` and close.
    Bad {
        status: u16,
        message: String,
    },
}

fn bad(status: u16, message: impl Into<String>) -> ReadError {
    ReadError::Bad {
        status,
        message: message.into(),
    }
}

/// Reads more bytes into `buf`; `Ok(false)` at end of stream.
fn fill(stream: &mut impl Read, buf: &mut Vec<u8>) -> Result<bool, ReadError> {
    let mut chunk = [0u8; 4096];
    loop {
        match stream.read(&mut chunk) {
            Ok(0) => return Ok(false),
            Ok(n) => {
                buf.extend_from_slice(&chunk[..n]);
                return Ok(true);
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e)
                if e.kind() == io::ErrorKind::WouldBlock || e.kind() == io::ErrorKind::TimedOut =>
            {
                return Err(ReadError::TimedOut)
            }
            Err(e) => return Err(ReadError::Io(e)),
        }
    }
}

/// Reads one request from `stream`. `buf` carries bytes read past the end
/// of the previous request (pipelining) and keeps those past this one.
/// Answers `Expect: 100-continue` before reading the body.
pub fn read_request<S: Read + Write>(
    stream: &mut S,
    buf: &mut Vec<u8>,
) -> Result<Request, ReadError> {
    let (head_len, method, path, content_length, close, expect_continue) = loop {
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut req = httparse::Request::new(&mut headers);
        match req.parse(buf) {
            Ok(httparse::Status::Complete(n)) => {
                let method = req.method.unwrap_or("").to_string();
                let path = req.path.unwrap_or("").to_string();
                let http10 = req.version == Some(0);
                let mut length = 0usize;
                let mut close = http10;
                let mut expect = false;
                for h in req.headers.iter() {
                    let value = String::from_utf8_lossy(h.value).trim().to_string();
                    if h.name.eq_ignore_ascii_case("content-length") {
                        length = value
                            .parse()
                            .map_err(|_| bad(400, format!("bad Content-Length {value:?}")))?;
                    } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
                        return Err(bad(400, "chunked or encoded bodies are not accepted"));
                    } else if h.name.eq_ignore_ascii_case("connection") {
                        let v = value.to_ascii_lowercase();
                        close = v.contains("close") || (http10 && !v.contains("keep-alive"));
                    } else if h.name.eq_ignore_ascii_case("expect") {
                        expect = value.eq_ignore_ascii_case("100-continue");
                    }
                }
                if length > MAX_BODY {
                    return Err(bad(
                        413,
                        format!("request body of {length} bytes; the limit is {MAX_BODY}"),
                    ));
                }
                break (n, method, path, length, close, expect);
            }
            Ok(httparse::Status::Partial) => {
                if buf.len() > MAX_HEAD {
                    return Err(bad(431, format!("request head over {MAX_HEAD} bytes")));
                }
                let was_empty = buf.is_empty();
                if !fill(stream, buf)? {
                    return Err(if was_empty {
                        ReadError::Closed
                    } else {
                        bad(400, "the connection closed in the middle of a request")
                    });
                }
            }
            Err(e) => return Err(bad(400, format!("malformed request: {e}"))),
        }
    };
    if expect_continue && buf.len() < head_len + content_length {
        stream
            .write_all(b"HTTP/1.1 100 Continue\r\n\r\n")
            .map_err(ReadError::Io)?;
    }
    while buf.len() < head_len + content_length {
        if !fill(stream, buf)? {
            return Err(bad(400, "the connection closed in the middle of a body"));
        }
    }
    let body = buf[head_len..head_len + content_length].to_vec();
    buf.drain(..head_len + content_length);
    Ok(Request {
        method,
        path,
        body,
        close,
    })
}

/// A response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    pub status: u16,
    /// Content type and bytes.
    pub body: Option<(&'static str, Vec<u8>)>,
}

impl Response {
    pub fn json(status: u16, value: &serde_json::Value) -> Response {
        Response {
            status,
            body: Some(("application/json", value.to_string().into_bytes())),
        }
    }

    pub fn text(status: u16, message: &str) -> Response {
        Response {
            status,
            body: Some(("text/plain", message.as_bytes().to_vec())),
        }
    }

    pub fn empty(status: u16) -> Response {
        Response { status, body: None }
    }
}

/// The reason phrase of the status codes the API uses.
pub fn reason(status: u16) -> &'static str {
    match status {
        100 => "Continue",
        200 => "OK",
        204 => "No Content",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        413 => "Payload Too Large",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        503 => "Service Unavailable",
        _ => "",
    }
}

/// Writes `r`, with `Connection: close` when the connection ends after it.
pub fn write_response(w: &mut impl Write, r: &Response, close: bool) -> io::Result<()> {
    let mut out = format!(
        "HTTP/1.1 {} {}\r\nServer: Cloud Hypervisor API\r\nConnection: {}\r\n",
        r.status,
        reason(r.status),
        if close { "close" } else { "keep-alive" }
    )
    .into_bytes();
    match &r.body {
        Some((ty, body)) => {
            out.extend_from_slice(
                format!(
                    "Content-Type: {ty}\r\nContent-Length: {}\r\n\r\n",
                    body.len()
                )
                .as_bytes(),
            );
            out.extend_from_slice(body);
        }
        None if r.status == 204 => out.extend_from_slice(b"\r\n"),
        None => out.extend_from_slice(b"Content-Length: 0\r\n\r\n"),
    }
    w.write_all(&out)?;
    w.flush()
}

/// A response as a client reads it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientResponse {
    pub status: u16,
    pub body: Vec<u8>,
}

/// Sends one request on `stream` and reads its response (the client side,
/// for `ch-remote` and the tests).
pub fn exchange<S: Read + Write>(
    stream: &mut S,
    method: &str,
    path: &str,
    body: Option<&[u8]>,
) -> io::Result<ClientResponse> {
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: localhost\r\nAccept: */*\r\n");
    if let Some(b) = body {
        req.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n",
            b.len()
        ));
    }
    req.push_str("\r\n");
    let mut bytes = req.into_bytes();
    if let Some(b) = body {
        bytes.extend_from_slice(b);
    }
    if let Err(e) = stream.write_all(&bytes) {
        // A server that refuses the connection (503) answers and closes
        // without reading: its answer may still be there to read.
        if e.kind() != io::ErrorKind::BrokenPipe {
            return Err(e);
        }
    }
    read_response(stream)
}

/// Reads one response (status, then a body by Content-Length, or none for
/// 1xx/204).
pub fn read_response(stream: &mut impl Read) -> io::Result<ClientResponse> {
    let invalid = |m: String| io::Error::new(io::ErrorKind::InvalidData, m);
    let mut buf = Vec::new();
    loop {
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut resp = httparse::Response::new(&mut headers);
        match resp.parse(&buf) {
            Ok(httparse::Status::Complete(n)) => {
                let status = resp.code.unwrap_or(0);
                if status == 100 {
                    buf.drain(..n);
                    continue;
                }
                let length = resp
                    .headers
                    .iter()
                    .find(|h| h.name.eq_ignore_ascii_case("content-length"))
                    .map(|h| String::from_utf8_lossy(h.value).trim().parse::<usize>())
                    .transpose()
                    .map_err(|_| invalid("bad Content-Length in the response".into()))?
                    .unwrap_or(0);
                while buf.len() < n + length {
                    match fill(stream, &mut buf) {
                        Ok(true) => {}
                        Ok(false) => return Err(invalid("the response ended early".into())),
                        Err(ReadError::Io(e)) => return Err(e),
                        Err(_) => return Err(io::ErrorKind::TimedOut.into()),
                    }
                }
                return Ok(ClientResponse {
                    status,
                    body: buf[n..n + length].to_vec(),
                });
            }
            Ok(httparse::Status::Partial) => match fill(stream, &mut buf) {
                Ok(true) => {}
                Ok(false) => return Err(invalid("the server closed the connection".into())),
                Err(ReadError::Io(e)) => return Err(e),
                Err(_) => return Err(io::ErrorKind::TimedOut.into()),
            },
            Err(e) => return Err(invalid(format!("malformed response: {e}"))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A stream that yields `input` in chunks of `step` bytes and records
    /// what is written.
    struct Script {
        input: Vec<u8>,
        at: usize,
        step: usize,
        out: Vec<u8>,
    }

    impl Script {
        fn new(input: &[u8], step: usize) -> Script {
            Script {
                input: input.to_vec(),
                at: 0,
                step,
                out: Vec::new(),
            }
        }
    }

    impl Read for Script {
        fn read(&mut self, b: &mut [u8]) -> io::Result<usize> {
            let n = self.step.min(b.len()).min(self.input.len() - self.at);
            b[..n].copy_from_slice(&self.input[self.at..self.at + n]);
            self.at += n;
            Ok(n)
        }
    }

    impl Write for Script {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            self.out.extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    fn status_of(e: ReadError) -> u16 {
        match e {
            ReadError::Bad { status, .. } => status,
            other => panic!("expected a bad request, got {other:?}"),
        }
    }

    #[test]
    fn pipelined_requests_in_small_pieces() {
        let input = b"GET /api/v1/vmm.ping HTTP/1.1\r\nHost: x\r\n\r\n\
PUT /api/v1/vm.snapshot HTTP/1.1\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello";
        for step in [1, 3, 4096] {
            let mut s = Script::new(input, step);
            let mut buf = Vec::new();
            let a = read_request(&mut s, &mut buf).unwrap();
            assert_eq!(
                (a.method.as_str(), a.path.as_str()),
                ("GET", "/api/v1/vmm.ping")
            );
            assert!(a.body.is_empty() && !a.close);
            let b = read_request(&mut s, &mut buf).unwrap();
            assert_eq!(b.method, "PUT");
            assert_eq!(b.body, b"hello");
            assert!(b.close);
            assert!(matches!(
                read_request(&mut s, &mut buf),
                Err(ReadError::Closed)
            ));
        }
    }

    #[test]
    fn malformed_oversized_and_cut_requests_get_their_status() {
        let cases: [(&[u8], u16); 5] = [
            (b"GET\x01 / HTTP/1.1\r\n\r\n", 400),
            (b"PUT /x HTTP/1.1\r\nContent-Length: nope\r\n\r\n", 400),
            (
                b"PUT /x HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
                400,
            ),
            (b"PUT /x HTTP/1.1\r\nContent-Length: 99999999\r\n\r\n", 413),
            (b"PUT /x HTTP/1.1\r\nContent-Length: 10\r\n\r\nabc", 400),
        ];
        for (input, want) in cases {
            let mut s = Script::new(input, 7);
            let got = status_of(read_request(&mut s, &mut Vec::new()).unwrap_err());
            assert_eq!(got, want, "{:?}", String::from_utf8_lossy(input));
        }
        let mut huge = b"GET /x HTTP/1.1\r\nX-Pad: ".to_vec();
        huge.extend(std::iter::repeat_n(b'a', MAX_HEAD + 10));
        let mut s = Script::new(&huge, 4096);
        assert_eq!(
            status_of(read_request(&mut s, &mut Vec::new()).unwrap_err()),
            431
        );
    }

    #[test]
    fn expect_continue_is_answered_before_the_body() {
        let mut s = Script::new(
            b"PUT /x HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\nok",
            // The head (60 bytes) arrives alone: the client waits for 100.
            60,
        );
        let r = read_request(&mut s, &mut Vec::new()).unwrap();
        assert_eq!(r.body, b"ok");
        assert_eq!(s.out, b"HTTP/1.1 100 Continue\r\n\r\n");
    }

    #[test]
    fn responses_round_trip_through_the_client_reader() {
        for r in [
            Response::json(200, &serde_json::json!({"a": 1})),
            Response::empty(204),
            Response::text(405, "no"),
        ] {
            let mut out = Vec::new();
            write_response(&mut out, &r, false).unwrap();
            let text = String::from_utf8_lossy(&out).to_string();
            assert!(
                text.starts_with(&format!("HTTP/1.1 {} ", r.status)),
                "{text}"
            );
            let back = read_response(&mut &out[..]).unwrap();
            assert_eq!(back.status, r.status);
            assert_eq!(back.body, r.body.map(|b| b.1).unwrap_or_default());
        }
    }
}
