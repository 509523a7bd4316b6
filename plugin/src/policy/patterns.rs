//! Lua 5.4's string patterns (`find`, `match`, `gmatch`, `gsub`) written again with a meter.
//! The C versions cannot be interrupted: a pattern such as `".-.-.-.-b"` backtracks for
//! seconds inside one call, where no instruction hook fires. Here every step of the matcher
//! is charged to the call's budget and deadline, so such a call ends like a runaway loop.
//! The semantics follow `lstrlib.c` (C locale classes, captures, `%b`, `%f`, anchors).

use mlua::{Lua, MultiValue, Table, Value};

use super::sandbox::Meter;

/// Captures per pattern, and matcher recursion depth (as Lua's `LUA_MAXCAPTURES`, `MAXCCALLS`).
const MAX_CAPTURES: usize = 32;
const MAX_DEPTH: usize = 200;
/// Matcher steps charged to the meter at once.
const CHARGE_EVERY: u32 = 256;
const ESC: u8 = b'%';
const SPECIALS: &[u8] = b"^$*+?.([%-";

#[derive(Debug, Clone, Copy)]
enum Capture {
    Unfinished(usize),
    Position(usize),
    Closed(usize, usize),
}

struct Matcher<'a> {
    src: &'a [u8],
    pat: &'a [u8],
    captures: Vec<Capture>,
    depth: usize,
    steps: u32,
    meter: &'a Meter,
}

type Step<T> = Result<T, mlua::Error>;

fn error(message: impl Into<String>) -> mlua::Error {
    mlua::Error::RuntimeError(message.into())
}

impl<'a> Matcher<'a> {
    fn new(src: &'a [u8], pat: &'a [u8], meter: &'a Meter) -> Self {
        Self {
            src,
            pat,
            captures: Vec::new(),
            depth: MAX_DEPTH,
            steps: 0,
            meter,
        }
    }

    fn reset(&mut self) {
        self.captures.clear();
        self.depth = MAX_DEPTH;
    }

    /// Charges one step; the meter decides whether the call may go on.
    fn step(&mut self) -> Step<()> {
        self.steps += 1;
        if self.steps >= CHARGE_EVERY {
            self.meter.charge(u64::from(self.steps))?;
            self.steps = 0;
        }
        Ok(())
    }

    fn pat_at(&self, p: usize) -> Option<u8> {
        self.pat.get(p).copied()
    }

    fn class_end(&self, mut p: usize) -> Step<usize> {
        let c = self.pat[p];
        p += 1;
        match c {
            ESC => {
                if p >= self.pat.len() {
                    return Err(error("malformed pattern (ends with '%')"));
                }
                Ok(p + 1)
            }
            b'[' => {
                if self.pat_at(p) == Some(b'^') {
                    p += 1;
                }
                loop {
                    if p >= self.pat.len() {
                        return Err(error("malformed pattern (missing ']')"));
                    }
                    let c = self.pat[p];
                    p += 1;
                    if c == ESC && p < self.pat.len() {
                        p += 1;
                    }
                    if self.pat_at(p) == Some(b']') {
                        return Ok(p + 1);
                    }
                }
            }
            _ => Ok(p),
        }
    }

    fn single(&self, s: usize, p: usize, ep: usize) -> bool {
        let Some(&c) = self.src.get(s) else {
            return false;
        };
        match self.pat[p] {
            b'.' => true,
            ESC => class(c, self.pat[p + 1]),
            b'[' => self.bracket(c, p, ep - 1),
            literal => literal == c,
        }
    }

    /// `c` against the set `[...]` from `p` (the `[`) to `ec` (the `]`).
    fn bracket(&self, c: u8, mut p: usize, ec: usize) -> bool {
        let mut found = true;
        if self.pat[p + 1] == b'^' {
            found = false;
            p += 1;
        }
        p += 1;
        while p < ec {
            if self.pat[p] == ESC {
                p += 1;
                if class(c, self.pat[p]) {
                    return found;
                }
            } else if self.pat[p + 1] == b'-' && p + 2 < ec {
                if self.pat[p] <= c && c <= self.pat[p + 2] {
                    return found;
                }
                p += 2;
            } else if self.pat[p] == c {
                return found;
            }
            p += 1;
        }
        !found
    }

    fn do_match(&mut self, s: usize, p: usize) -> Step<Option<usize>> {
        if self.depth == 0 {
            return Err(error("pattern too complex"));
        }
        self.depth -= 1;
        let result = self.match_here(s, p);
        self.depth += 1;
        result
    }

    fn match_here(&mut self, mut s: usize, mut p: usize) -> Step<Option<usize>> {
        loop {
            self.step()?;
            let Some(c) = self.pat_at(p) else {
                return Ok(Some(s));
            };
            match c {
                b'(' => {
                    return if self.pat_at(p + 1) == Some(b')') {
                        self.start_capture(s, p + 2, Capture::Position(s))
                    } else {
                        self.start_capture(s, p + 1, Capture::Unfinished(s))
                    };
                }
                b')' => return self.end_capture(s, p + 1),
                b'$' if p + 1 == self.pat.len() => {
                    return Ok((s == self.src.len()).then_some(s));
                }
                ESC if self.pat_at(p + 1) == Some(b'b') => match self.balance(s, p + 2)? {
                    Some(end) => {
                        s = end;
                        p += 4;
                        continue;
                    }
                    None => return Ok(None),
                },
                ESC if self.pat_at(p + 1) == Some(b'f') => {
                    p += 2;
                    if self.pat_at(p) != Some(b'[') {
                        return Err(error("missing '[' after '%f' in pattern"));
                    }
                    let ep = self.class_end(p)?;
                    let previous = if s == 0 { 0 } else { self.src[s - 1] };
                    let current = self.src.get(s).copied().unwrap_or(0);
                    if !self.bracket(previous, p, ep - 1) && self.bracket(current, p, ep - 1) {
                        p = ep;
                        continue;
                    }
                    return Ok(None);
                }
                ESC if self.pat_at(p + 1).is_some_and(|d| d.is_ascii_digit()) => {
                    match self.match_capture(s, self.pat[p + 1])? {
                        Some(end) => {
                            s = end;
                            p += 2;
                            continue;
                        }
                        None => return Ok(None),
                    }
                }
                _ => {
                    let ep = self.class_end(p)?;
                    let repeat = self.pat_at(ep);
                    if !self.single(s, p, ep) {
                        if matches!(repeat, Some(b'*' | b'?' | b'-')) {
                            p = ep + 1;
                            continue;
                        }
                        return Ok(None);
                    }
                    match repeat {
                        Some(b'?') => {
                            if let Some(end) = self.do_match(s + 1, ep + 1)? {
                                return Ok(Some(end));
                            }
                            p = ep + 1;
                        }
                        Some(b'+') => return self.max_expand(s + 1, p, ep),
                        Some(b'*') => return self.max_expand(s, p, ep),
                        Some(b'-') => return self.min_expand(s, p, ep),
                        _ => {
                            s += 1;
                            p = ep;
                        }
                    }
                }
            }
        }
    }

    fn max_expand(&mut self, s: usize, p: usize, ep: usize) -> Step<Option<usize>> {
        let mut count = 0;
        while self.single(s + count, p, ep) {
            self.step()?;
            count += 1;
        }
        loop {
            if let Some(end) = self.do_match(s + count, ep + 1)? {
                return Ok(Some(end));
            }
            if count == 0 {
                return Ok(None);
            }
            count -= 1;
        }
    }

    fn min_expand(&mut self, mut s: usize, p: usize, ep: usize) -> Step<Option<usize>> {
        loop {
            if let Some(end) = self.do_match(s, ep + 1)? {
                return Ok(Some(end));
            }
            if !self.single(s, p, ep) {
                return Ok(None);
            }
            s += 1;
        }
    }

    fn start_capture(&mut self, s: usize, p: usize, capture: Capture) -> Step<Option<usize>> {
        if self.captures.len() >= MAX_CAPTURES {
            return Err(error("too many captures"));
        }
        self.captures.push(capture);
        let result = self.do_match(s, p)?;
        if result.is_none() {
            self.captures.pop();
        }
        Ok(result)
    }

    fn end_capture(&mut self, s: usize, p: usize) -> Step<Option<usize>> {
        let open = self
            .captures
            .iter()
            .rposition(|c| matches!(c, Capture::Unfinished(_)))
            .ok_or_else(|| error("invalid pattern capture"))?;
        let Capture::Unfinished(start) = self.captures[open] else {
            return Err(error("invalid pattern capture"));
        };
        self.captures[open] = Capture::Closed(start, s);
        let result = self.do_match(s, p)?;
        if result.is_none() {
            self.captures[open] = Capture::Unfinished(start);
        }
        Ok(result)
    }

    fn balance(&mut self, s: usize, p: usize) -> Step<Option<usize>> {
        if p + 1 >= self.pat.len() {
            return Err(error("malformed pattern (missing arguments to '%b')"));
        }
        let (open, close) = (self.pat[p], self.pat[p + 1]);
        if self.src.get(s) != Some(&open) {
            return Ok(None);
        }
        let mut depth = 1;
        for (i, &c) in self.src.iter().enumerate().skip(s + 1) {
            self.step()?;
            if c == close {
                depth -= 1;
                if depth == 0 {
                    return Ok(Some(i + 1));
                }
            } else if c == open {
                depth += 1;
            }
        }
        Ok(None)
    }

    fn match_capture(&mut self, s: usize, digit: u8) -> Step<Option<usize>> {
        let index = usize::from(digit).wrapping_sub(usize::from(b'1'));
        let Some(Capture::Closed(start, end)) = self.captures.get(index).copied() else {
            return Err(error(format!(
                "invalid capture index %{}",
                char::from(digit)
            )));
        };
        let captured = &self.src[start..end];
        Ok(self
            .src
            .get(s..s + captured.len())
            .filter(|here| *here == captured)
            .map(|_| s + captured.len()))
    }

    /// Capture `index` of a match `s..e` (the whole match when there are none).
    fn capture(&self, lua: &Lua, index: usize, s: usize, e: usize) -> Step<Value> {
        let Some(capture) = self.captures.get(index) else {
            if index == 0 {
                return Ok(Value::String(lua.create_string(&self.src[s..e])?));
            }
            return Err(error(format!("invalid capture index %{}", index + 1)));
        };
        match *capture {
            Capture::Unfinished(_) => Err(error("unfinished capture")),
            Capture::Position(at) => Ok(Value::Integer(position(at + 1))),
            Capture::Closed(start, end) => {
                Ok(Value::String(lua.create_string(&self.src[start..end])?))
            }
        }
    }

    /// Every capture of a match `s..e`, or the whole match when the pattern has none.
    fn captures(&self, lua: &Lua, s: usize, e: usize, whole: bool) -> Step<Vec<Value>> {
        let count = if self.captures.is_empty() && whole {
            1
        } else {
            self.captures.len()
        };
        (0..count).map(|i| self.capture(lua, i, s, e)).collect()
    }
}

fn position(index: usize) -> i64 {
    i64::try_from(index).unwrap_or(i64::MAX)
}

/// Lua's character classes, in the C locale.
fn class(c: u8, class: u8) -> bool {
    let found = match class.to_ascii_lowercase() {
        b'a' => c.is_ascii_alphabetic(),
        b'c' => c.is_ascii_control(),
        b'd' => c.is_ascii_digit(),
        b'g' => c.is_ascii_graphic(),
        b'l' => c.is_ascii_lowercase(),
        b'p' => c.is_ascii_punctuation(),
        b's' => matches!(c, b' ' | b'\t' | b'\n' | 0x0b | 0x0c | b'\r'),
        b'u' => c.is_ascii_uppercase(),
        b'w' => c.is_ascii_alphanumeric(),
        b'x' => c.is_ascii_hexdigit(),
        _ => return class == c,
    };
    if class.is_ascii_uppercase() {
        !found
    } else {
        found
    }
}

/// A 1-based, possibly negative Lua position into `len` bytes, as a 0-based start.
fn start_of(init: Option<i64>, len: usize) -> Option<usize> {
    let len_i = i64::try_from(len).unwrap_or(i64::MAX);
    let init = match init.unwrap_or(1) {
        i if i > 0 => i,
        0 => 1,
        i if i < -len_i => 1,
        i => len_i + i + 1,
    };
    if init > len_i + 1 {
        return None;
    }
    usize::try_from(init - 1).ok()
}

fn bytes(value: &mlua::LuaString) -> Vec<u8> {
    value.as_bytes().to_vec()
}

/// `string.find` and `string.match`.
fn find_or_match(
    lua: &Lua,
    meter: &Meter,
    (text, pattern, init, plain): (mlua::LuaString, mlua::LuaString, Option<i64>, Option<bool>),
    find: bool,
) -> mlua::Result<MultiValue> {
    let (src, pat) = (text.as_bytes(), pattern.as_bytes());
    let (src, pat): (&[u8], &[u8]) = (&src, &pat);
    let Some(start) = start_of(init, src.len()) else {
        return Ok(MultiValue::from_vec(vec![Value::Nil]));
    };
    if find && (plain.unwrap_or(false) || !pat.iter().any(|c| SPECIALS.contains(c))) {
        meter.charge(u64::try_from(src.len().saturating_sub(start)).unwrap_or(u64::MAX))?;
        let found = src[start..]
            .windows(pat.len().max(1))
            .position(|window| pat.is_empty() || window == pat)
            .map(|at| at + start)
            .filter(|at| pat.is_empty() || *at + pat.len() <= src.len());
        return Ok(MultiValue::from_vec(match found {
            Some(at) => vec![
                Value::Integer(position(at + 1)),
                Value::Integer(position(at + pat.len())),
            ],
            None if pat.is_empty() => vec![
                Value::Integer(position(start + 1)),
                Value::Integer(position(start)),
            ],
            None => vec![Value::Nil],
        }));
    }
    let anchored = pat.first() == Some(&b'^');
    let body = if anchored { &pat[1..] } else { pat };
    let mut matcher = Matcher::new(src, body, meter);
    let mut s = start;
    loop {
        matcher.reset();
        if let Some(e) = matcher.do_match(s, 0)? {
            let mut values = Vec::new();
            if find {
                values.push(Value::Integer(position(s + 1)));
                values.push(Value::Integer(position(e)));
                values.extend(matcher.captures(lua, s, e, false)?);
            } else {
                values = matcher.captures(lua, s, e, true)?;
            }
            return Ok(MultiValue::from_vec(values));
        }
        s += 1;
        if anchored || s > src.len() {
            return Ok(MultiValue::from_vec(vec![Value::Nil]));
        }
    }
}

/// `string.gmatch`: an iterator over the matches.
fn gmatch(
    lua: &Lua,
    meter: Meter,
    (text, pattern, init): (mlua::LuaString, mlua::LuaString, Option<i64>),
) -> mlua::Result<mlua::Function> {
    let (src, pat) = (bytes(&text), bytes(&pattern));
    let mut next = start_of(init, src.len()).unwrap_or(src.len() + 1);
    let mut last: Option<usize> = None;
    lua.create_function_mut(move |lua, ()| {
        let mut matcher = Matcher::new(&src, &pat, &meter);
        while next <= src.len() {
            matcher.reset();
            let found = matcher.do_match(next, 0)?;
            if let Some(e) = found.filter(|e| Some(*e) != last) {
                let values = matcher.captures(lua, next, e, true)?;
                next = e;
                last = Some(e);
                return Ok(MultiValue::from_vec(values));
            }
            next += 1;
        }
        Ok(MultiValue::from_vec(vec![Value::Nil]))
    })
}

/// `string.gsub`.
fn gsub(
    lua: &Lua,
    meter: &Meter,
    (text, pattern, replacement, max): (mlua::LuaString, mlua::LuaString, Value, Option<i64>),
) -> mlua::Result<(mlua::LuaString, i64)> {
    let (src, pat) = (text.as_bytes(), pattern.as_bytes());
    let (src, pat): (&[u8], &[u8]) = (&src, &pat);
    if !matches!(
        replacement,
        Value::String(_)
            | Value::Integer(_)
            | Value::Number(_)
            | Value::Table(_)
            | Value::Function(_)
    ) {
        return Err(error(
            "bad argument #3 to 'gsub' (string/function/table expected)",
        ));
    }
    let anchored = pat.first() == Some(&b'^');
    let body = if anchored { &pat[1..] } else { pat };
    let max = max.unwrap_or(i64::MAX);
    let mut matcher = Matcher::new(src, body, meter);
    let mut out: Vec<u8> = Vec::with_capacity(src.len());
    let (mut s, mut count, mut last) = (0usize, 0i64, None);
    while count < max {
        matcher.reset();
        let found = matcher.do_match(s, 0)?.filter(|e| Some(*e) != last);
        if let Some(e) = found {
            count += 1;
            replace(lua, &matcher, &replacement, s, e, &mut out)?;
            s = e;
            last = Some(e);
        } else if s < src.len() {
            out.push(src[s]);
            s += 1;
        } else {
            break;
        }
        meter.charge(1)?;
        if anchored {
            break;
        }
    }
    out.extend_from_slice(&src[s.min(src.len())..]);
    Ok((lua.create_string(&out)?, count))
}

/// Appends the replacement of the match `s..e` to `out`.
fn replace(
    lua: &Lua,
    matcher: &Matcher<'_>,
    replacement: &Value,
    s: usize,
    e: usize,
    out: &mut Vec<u8>,
) -> mlua::Result<()> {
    let value = match replacement {
        Value::Function(function) => {
            let args = matcher.captures(lua, s, e, true)?;
            function.call::<Value>(MultiValue::from_vec(args))?
        }
        Value::Table(table) => {
            let key = matcher.capture(lua, 0, s, e)?;
            table.get::<Value>(key)?
        }
        other => {
            let template = lua.coerce_string(other.clone())?.map(|t| bytes(&t));
            return expand(lua, matcher, &template.unwrap_or_default(), s, e, out);
        }
    };
    match value {
        Value::Nil | Value::Boolean(false) => out.extend_from_slice(&matcher.src[s..e]),
        Value::String(text) => out.extend_from_slice(&text.as_bytes()),
        number @ (Value::Integer(_) | Value::Number(_)) => {
            if let Some(text) = lua.coerce_string(number)? {
                out.extend_from_slice(&text.as_bytes());
            }
        }
        other => {
            return Err(error(format!(
                "invalid replacement value (a {})",
                other.type_name()
            )))
        }
    }
    Ok(())
}

/// A replacement string with `%0`..`%9` and `%%`.
fn expand(
    lua: &Lua,
    matcher: &Matcher<'_>,
    template: &[u8],
    s: usize,
    e: usize,
    out: &mut Vec<u8>,
) -> mlua::Result<()> {
    let mut i = 0;
    while i < template.len() {
        let c = template[i];
        i += 1;
        if c != ESC {
            out.push(c);
            continue;
        }
        let Some(&next) = template.get(i) else {
            return Err(error("invalid use of '%' in replacement string"));
        };
        i += 1;
        match next {
            ESC => out.push(ESC),
            b'0' => out.extend_from_slice(&matcher.src[s..e]),
            b'1'..=b'9' => {
                let value = matcher.capture(lua, usize::from(next - b'1'), s, e)?;
                match lua.coerce_string(value)? {
                    Some(text) => out.extend_from_slice(&text.as_bytes()),
                    None => return Err(error("invalid capture value")),
                }
            }
            _ => return Err(error("invalid use of '%' in replacement string")),
        }
    }
    Ok(())
}

/// Replaces `find`, `match`, `gmatch` and `gsub` of `string` with the metered versions.
pub(super) fn install(lua: &Lua, string: &Table, meter: &Meter) -> mlua::Result<()> {
    let m = meter.clone();
    string.set(
        "find",
        lua.create_function(move |lua, args| find_or_match(lua, &m, args, true))?,
    )?;
    let m = meter.clone();
    string.set(
        "match",
        lua.create_function(move |lua, args| find_or_match(lua, &m, args, false))?,
    )?;
    let m = meter.clone();
    string.set(
        "gmatch",
        lua.create_function(move |lua, args| gmatch(lua, m.clone(), args))?,
    )?;
    let m = meter.clone();
    string.set(
        "gsub",
        lua.create_function(move |lua, args| gsub(lua, &m, args))?,
    )?;
    Ok(())
}
