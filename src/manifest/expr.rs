//! The small expression language of kernel manifests.
//!
//! A manifest computes push constants, specialization constants, dispatch grids, buffer sizes and
//! admission predicates from a test case's parameters and the device's properties, e.g.
//! `div_ceil(KV, Bc)`, `T * H * D * 4`, `has_sinks ? (1 << 24) | log2(H) : log2(H)` or
//! `KV % Bc == 0 && k_stride_pos % 8 == 0`.
//!
//! The manifest is user input, so nothing here panics on any input: every failure is an
//! [`ExprError`] whose message starts with the expression (or definition) text and says what went
//! wrong. Integer arithmetic is checked (overflow, division by zero, negative operands of `/` and
//! `%`, out-of-range shift counts are errors) and the parser bounds its recursion depth and the
//! height of the tree it builds, so hostile input cannot overflow the stack.
//!
//! Grammar, lowest precedence first (all binary operators are left-associative):
//!
//! ```text
//! expr    := or ( "?" expr ":" expr )?            right-associative
//! or      := and ( "||" and )*
//! and     := bitor ( "&&" bitor )*
//! bitor   := bitxor ( "|" bitxor )*
//! bitxor  := bitand ( "^" bitand )*
//! bitand  := eq ( "&" eq )*
//! eq      := cmp ( ( "==" | "!=" ) cmp )*
//! cmp     := shift ( ( "<" | "<=" | ">" | ">=" ) shift )*
//! shift   := add ( ( "<<" | ">>" ) add )*
//! add     := mul ( ( "+" | "-" ) mul )*
//! mul     := unary ( ( "*" | "/" | "%" ) unary )*
//! unary   := ( "-" | "!" | "~" ) unary | primary
//! primary := INT | FLOAT | "true" | "false" | "inf" | IDENT | IDENT "(" args? ")" | "(" expr ")"
//! args    := expr ( "," expr )*
//! ```

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::hash::BuildHasher;

/// The longest accepted expression, in characters.
pub const MAX_SOURCE_CHARS: usize = 4096;
/// How deeply parentheses, function arguments, `?:` branches and unary operators may nest.
pub const MAX_NESTING: usize = 64;
/// The greatest height of the syntax tree (long operator chains such as `a + b + c + ...`).
pub const MAX_TREE_HEIGHT: usize = 256;
/// How many known names an "unknown identifier" error lists.
const MAX_LISTED_NAMES: usize = 40;
/// How much of an over-long expression an error message quotes.
const QUOTED_PREFIX_CHARS: usize = 60;

// ---------------------------------------------------------------------------------------------
// Values and environments
// ---------------------------------------------------------------------------------------------

/// A value an expression computes or reads.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Value {
    Int(i64),
    Float(f64),
    Bool(bool),
}

impl Value {
    /// `"int"`, `"float"` or `"bool"`.
    pub fn type_name(&self) -> &'static str {
        match self {
            Value::Int(_) => "int",
            Value::Float(_) => "float",
            Value::Bool(_) => "bool",
        }
    }

    /// The type and the value, e.g. `float 1.5`.
    fn describe(&self) -> String {
        format!("{} {}", self.type_name(), self)
    }

    fn as_f64(&self) -> Option<f64> {
        match *self {
            Value::Int(i) => Some(i as f64),
            Value::Float(x) => Some(x),
            Value::Bool(_) => None,
        }
    }

    fn is_nan(&self) -> bool {
        matches!(self, Value::Float(x) if x.is_nan())
    }
}

impl fmt::Display for Value {
    /// Ints print in decimal, floats always with a fraction or exponent (`1.0`, `1e-7`, `inf`),
    /// bools as `true`/`false`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Value::Int(i) => write!(f, "{i}"),
            Value::Float(x) => write!(f, "{x:?}"),
            Value::Bool(b) => write!(f, "{b}"),
        }
    }
}

impl From<i64> for Value {
    fn from(v: i64) -> Self {
        Value::Int(v)
    }
}

impl From<f64> for Value {
    fn from(v: f64) -> Self {
        Value::Float(v)
    }
}

impl From<bool> for Value {
    fn from(v: bool) -> Self {
        Value::Bool(v)
    }
}

/// Where expressions look up their variables.
pub trait Env {
    /// The value of variable `name`, if it is defined.
    fn get(&self, name: &str) -> Option<Value>;
    /// The names of all defined variables (any order), listed in "unknown identifier" errors.
    fn names(&self) -> Vec<String>;
}

impl Env for BTreeMap<String, Value> {
    fn get(&self, name: &str) -> Option<Value> {
        BTreeMap::get(self, name).copied()
    }

    fn names(&self) -> Vec<String> {
        self.keys().cloned().collect()
    }
}

impl<S: BuildHasher> Env for HashMap<String, Value, S> {
    fn get(&self, name: &str) -> Option<Value> {
        HashMap::get(self, name).copied()
    }

    fn names(&self) -> Vec<String> {
        self.keys().cloned().collect()
    }
}

// ---------------------------------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------------------------------

/// What an error is about: a lone expression, or a `name = expr` definition of a [`Lets`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Origin {
    /// The expression's source text.
    Expression(String),
    /// The definition's text, `name = expr`.
    Definition(String),
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Origin::Expression(s) => write!(f, "expression `{s}`"),
            Origin::Definition(s) => write!(f, "definition `{s}`"),
        }
    }
}

/// What went wrong while evaluating an expression.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum EvalErrorKind {
    /// Integer arithmetic left the range of i64; `operation` shows the operands, e.g. `4 << 62`.
    #[error("integer overflow in {operation}")]
    Overflow { operation: String },
    /// Integer `/`, `%` or `div_ceil` by zero.
    #[error("division by zero in {operation}")]
    DivisionByZero { operation: String },
    /// Integer `/` or `%` with a negative operand.
    #[error("negative operand in {operation} (integer `/` and `%` need non-negative operands)")]
    NegativeOperand { operation: String },
    /// A shift count outside `0..=62`.
    #[error("shift count out of range in {operation} (it must be 0..=62)")]
    ShiftOutOfRange { operation: String },
    /// A float operation produced, or was given, NaN.
    #[error("not a number (NaN) in {operation}")]
    NotANumber { operation: String },
    /// An operator was applied to operands of the wrong type.
    #[error("{message}")]
    Type { message: String },
    /// `&&`, `||`, `!` or the condition of `?:` got something other than a bool.
    #[error("expected a boolean for {context}, found {}", .found.describe())]
    ExpectedBool { context: &'static str, found: Value },
    /// A function got an argument of the wrong type or outside its domain.
    #[error("function `{function}`: {message}")]
    Function { function: &'static str, message: String },
    /// The result does not fit the type the caller asked for (`eval_u32` and friends).
    #[error("evaluated to {value}, expected {target}")]
    Conversion { value: Value, target: &'static str },
}

/// Any failure to parse or evaluate an expression or a definition.
///
/// The message always starts with ``expression `<source>`: `` or ``definition `<name = source>`: ``.
/// Offsets count characters from the start of that quoted text.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum ExprError {
    #[error("{origin}: too long ({length} characters; the limit is {MAX_SOURCE_CHARS})")]
    TooLong { origin: Origin, length: usize },
    #[error("{origin}: expected {expected} at offset {offset}, found {found}")]
    Parse { origin: Origin, offset: usize, expected: String, found: String },
    #[error("{origin}: nested too deeply at offset {offset} (more than {limit} levels)")]
    TooDeep { origin: Origin, offset: usize, limit: usize },
    #[error("{origin}: unknown function `{name}` at offset {offset} (functions: {})", function_list())]
    UnknownFunction { origin: Origin, offset: usize, name: String },
    #[error("{origin}: function `{function}` takes {}, found {found} at offset {offset}", arguments(.expected))]
    Arity { origin: Origin, offset: usize, function: &'static str, expected: usize, found: usize },
    #[error("{origin}: unknown identifier `{name}`{}", known_names(.known, .more))]
    UnknownIdentifier { origin: Origin, name: String, known: Vec<String>, more: usize },
    #[error("{origin}: {kind}{}", at_suffix(.at.as_deref()))]
    Eval { origin: Origin, at: Option<String>, kind: EvalErrorKind },
    /// A malformed [`Lets`] entry (not `name = expr`, a bad or reused name).
    #[error("definition `{text}`: {message}")]
    Definition { text: String, message: String },
}

fn function_list() -> String {
    FUNCTIONS.iter().map(|f| f.0).collect::<Vec<_>>().join(", ")
}

fn arguments(n: &usize) -> String {
    if *n == 1 { "1 argument".to_string() } else { format!("{n} arguments") }
}

fn known_names(known: &[String], more: &usize) -> String {
    if known.is_empty() {
        " (no variables are defined)".to_string()
    } else if *more == 0 {
        format!(" (known: {})", known.join(", "))
    } else {
        format!(" (known: {}, and {more} more)", known.join(", "))
    }
}

fn at_suffix(at: Option<&str>) -> String {
    at.map(|s| format!(" (in `{s}`)")).unwrap_or_default()
}

fn quote_prefix(s: &str) -> String {
    if s.chars().count() <= QUOTED_PREFIX_CHARS {
        s.to_string()
    } else {
        let mut out: String = s.chars().take(QUOTED_PREFIX_CHARS).collect();
        out.push_str("...");
        out
    }
}

impl ExprError {
    /// Re-targets an expression error at a definition; `shift` moves offsets to the definition text.
    fn in_definition(self, text: &str, shift: usize) -> ExprError {
        let origin = Origin::Definition(text.to_string());
        match self {
            ExprError::TooLong { length, .. } => {
                ExprError::TooLong { origin: Origin::Definition(quote_prefix(text)), length }
            }
            ExprError::Parse { offset, expected, found, .. } => {
                ExprError::Parse { origin, offset: offset + shift, expected, found }
            }
            ExprError::TooDeep { offset, limit, .. } => ExprError::TooDeep { origin, offset: offset + shift, limit },
            ExprError::UnknownFunction { offset, name, .. } => {
                ExprError::UnknownFunction { origin, offset: offset + shift, name }
            }
            ExprError::Arity { offset, function, expected, found, .. } => {
                ExprError::Arity { origin, offset: offset + shift, function, expected, found }
            }
            ExprError::UnknownIdentifier { name, known, more, .. } => {
                ExprError::UnknownIdentifier { origin, name, known, more }
            }
            ExprError::Eval { at, kind, .. } => ExprError::Eval { origin, at, kind },
            e @ ExprError::Definition { .. } => e,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Syntax tree
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum BinOp {
    Or,
    And,
    BitOr,
    BitXor,
    BitAnd,
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
    Shl,
    Shr,
    Add,
    Sub,
    Mul,
    Div,
    Rem,
}

impl BinOp {
    fn symbol(self) -> &'static str {
        match self {
            BinOp::Or => "||",
            BinOp::And => "&&",
            BinOp::BitOr => "|",
            BinOp::BitXor => "^",
            BinOp::BitAnd => "&",
            BinOp::Eq => "==",
            BinOp::Ne => "!=",
            BinOp::Lt => "<",
            BinOp::Le => "<=",
            BinOp::Gt => ">",
            BinOp::Ge => ">=",
            BinOp::Shl => "<<",
            BinOp::Shr => ">>",
            BinOp::Add => "+",
            BinOp::Sub => "-",
            BinOp::Mul => "*",
            BinOp::Div => "/",
            BinOp::Rem => "%",
        }
    }

    /// Binding strength; higher binds tighter.
    fn precedence(self) -> u8 {
        match self {
            BinOp::Or => 1,
            BinOp::And => 2,
            BinOp::BitOr => 3,
            BinOp::BitXor => 4,
            BinOp::BitAnd => 5,
            BinOp::Eq | BinOp::Ne => 6,
            BinOp::Lt | BinOp::Le | BinOp::Gt | BinOp::Ge => 7,
            BinOp::Shl | BinOp::Shr => 8,
            BinOp::Add | BinOp::Sub => 9,
            BinOp::Mul | BinOp::Div | BinOp::Rem => 10,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum UnOp {
    Neg,
    Not,
    BitNot,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Func {
    Min,
    Max,
    DivCeil,
    AlignUp,
    Log2,
    Pow2Ceil,
    Float,
    Int,
    F32Bits,
    F16Bits,
    Clamp,
    Select,
}

/// Name, function, arity.
const FUNCTIONS: [(&str, Func, usize); 12] = [
    ("min", Func::Min, 2),
    ("max", Func::Max, 2),
    ("div_ceil", Func::DivCeil, 2),
    ("align_up", Func::AlignUp, 2),
    ("log2", Func::Log2, 1),
    ("pow2_ceil", Func::Pow2Ceil, 1),
    ("float", Func::Float, 1),
    ("int", Func::Int, 1),
    ("f32_bits", Func::F32Bits, 1),
    ("f16_bits", Func::F16Bits, 1),
    ("clamp", Func::Clamp, 3),
    ("select", Func::Select, 3),
];

impl Func {
    fn lookup(name: &str) -> Option<(&'static str, Func, usize)> {
        FUNCTIONS.iter().copied().find(|f| f.0 == name)
    }

    fn name(self) -> &'static str {
        FUNCTIONS.iter().find(|f| f.1 == self).map_or("?", |f| f.0)
    }
}

#[derive(Clone, Debug, PartialEq)]
enum NodeKind {
    Lit(Value),
    Var(String),
    Unary(UnOp, Box<Node>),
    Binary(BinOp, Box<Node>, Box<Node>),
    Cond(Box<Node>, Box<Node>, Box<Node>),
    Call(Func, Vec<Node>),
}

#[derive(Clone, Debug, PartialEq)]
struct Node {
    kind: NodeKind,
    /// Byte range of the node's text in the source.
    start: usize,
    end: usize,
    /// 1 for leaves.
    height: usize,
}

impl Node {
    fn children(&self) -> Vec<&Node> {
        match &self.kind {
            NodeKind::Lit(_) | NodeKind::Var(_) => Vec::new(),
            NodeKind::Unary(_, x) => vec![x],
            NodeKind::Binary(_, a, b) => vec![a, b],
            NodeKind::Cond(c, a, b) => vec![c, a, b],
            NodeKind::Call(_, args) => args.iter().collect(),
        }
    }

    fn collect_identifiers(&self, out: &mut BTreeSet<String>) {
        if let NodeKind::Var(name) = &self.kind {
            out.insert(name.clone());
        }
        for child in self.children() {
            child.collect_identifiers(out);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Lexer
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq)]
enum Tok {
    Lit(Value),
    Ident,
    Bin(BinOp),
    /// `!`
    Not,
    /// `~`
    Tilde,
    LParen,
    RParen,
    Comma,
    Question,
    Colon,
    End,
}

#[derive(Clone, Copy, Debug)]
struct Token {
    tok: Tok,
    /// Character offset, for messages.
    offset: usize,
    /// Byte range in the source.
    start: usize,
    end: usize,
}

struct Lexer<'a> {
    source: &'a str,
    chars: Vec<(usize, char)>,
    i: usize,
}

impl<'a> Lexer<'a> {
    fn new(source: &'a str) -> Self {
        Lexer { source, chars: source.char_indices().collect(), i: 0 }
    }

    fn peek(&self, k: usize) -> Option<char> {
        self.chars.get(self.i + k).map(|c| c.1)
    }

    fn byte(&self, i: usize) -> usize {
        self.chars.get(i).map_or(self.source.len(), |c| c.0)
    }

    fn error(&self, offset: usize, expected: &str, found: String) -> ExprError {
        ExprError::Parse {
            origin: Origin::Expression(self.source.to_string()),
            offset,
            expected: expected.to_string(),
            found,
        }
    }

    fn found_at(&self, i: usize) -> String {
        match self.chars.get(i) {
            Some((_, c)) => format!("{c:?}"),
            None => "end of input".to_string(),
        }
    }

    fn skip_digits(&mut self, radix: u32) {
        while self.peek(0).is_some_and(|c| c.is_digit(radix)) {
            self.i += 1;
        }
    }

    fn tokens(mut self) -> Result<Vec<Token>, ExprError> {
        let mut out = Vec::new();
        loop {
            while self.peek(0).is_some_and(char::is_whitespace) {
                self.i += 1;
            }
            let start = self.i;
            let Some(c) = self.peek(0) else {
                let end = self.source.len();
                out.push(Token { tok: Tok::End, offset: start, start: end, end });
                return Ok(out);
            };
            let next = self.peek(1);
            let (tok, len) = match c {
                '0'..='9' | '.' if c != '.' || next.is_some_and(|n| n.is_ascii_digit()) => {
                    (Tok::Lit(self.number()?), 0)
                }
                'a'..='z' | 'A'..='Z' | '_' => {
                    while self.peek(0).is_some_and(|c| c.is_ascii_alphanumeric() || c == '_') {
                        self.i += 1;
                    }
                    let tok = match &self.source[self.byte(start)..self.byte(self.i)] {
                        "true" => Tok::Lit(Value::Bool(true)),
                        "false" => Tok::Lit(Value::Bool(false)),
                        "inf" => Tok::Lit(Value::Float(f64::INFINITY)),
                        _ => Tok::Ident,
                    };
                    (tok, 0)
                }
                '(' => (Tok::LParen, 1),
                ')' => (Tok::RParen, 1),
                ',' => (Tok::Comma, 1),
                '?' => (Tok::Question, 1),
                ':' => (Tok::Colon, 1),
                '~' => (Tok::Tilde, 1),
                '+' => (Tok::Bin(BinOp::Add), 1),
                '-' => (Tok::Bin(BinOp::Sub), 1),
                '*' => (Tok::Bin(BinOp::Mul), 1),
                '/' => (Tok::Bin(BinOp::Div), 1),
                '%' => (Tok::Bin(BinOp::Rem), 1),
                '^' => (Tok::Bin(BinOp::BitXor), 1),
                '|' if next == Some('|') => (Tok::Bin(BinOp::Or), 2),
                '|' => (Tok::Bin(BinOp::BitOr), 1),
                '&' if next == Some('&') => (Tok::Bin(BinOp::And), 2),
                '&' => (Tok::Bin(BinOp::BitAnd), 1),
                '=' if next == Some('=') => (Tok::Bin(BinOp::Eq), 2),
                '!' if next == Some('=') => (Tok::Bin(BinOp::Ne), 2),
                '!' => (Tok::Not, 1),
                '<' if next == Some('<') => (Tok::Bin(BinOp::Shl), 2),
                '<' if next == Some('=') => (Tok::Bin(BinOp::Le), 2),
                '<' => (Tok::Bin(BinOp::Lt), 1),
                '>' if next == Some('>') => (Tok::Bin(BinOp::Shr), 2),
                '>' if next == Some('=') => (Tok::Bin(BinOp::Ge), 2),
                '>' => (Tok::Bin(BinOp::Gt), 1),
                '=' => {
                    return Err(self.error(start, "an operator", "'=' (use `==` to compare)".to_string()));
                }
                _ => {
                    let found = format!("character {c:?}");
                    return Err(self.error(start, "a value, an operator or a parenthesis", found));
                }
            };
            self.i += len;
            out.push(Token { tok, offset: start, start: self.byte(start), end: self.byte(self.i) });
        }
    }

    /// Lexes a number starting at the current character.
    fn number(&mut self) -> Result<Value, ExprError> {
        let start = self.i;
        if self.peek(0) == Some('0') && matches!(self.peek(1), Some('x' | 'X')) {
            self.i += 2;
            let digits = self.i;
            self.skip_digits(16);
            if digits == self.i {
                return Err(self.error(self.i, "hex digits after `0x`", self.found_at(self.i)));
            }
            let text = &self.source[self.byte(digits)..self.byte(self.i)];
            return i64::from_str_radix(text, 16).map(Value::Int).map_err(|_| {
                let found = format!("`{}`", &self.source[self.byte(start)..self.byte(self.i)]);
                self.error(start, "an integer literal that fits in 64 bits (at most 0x7fffffffffffffff)", found)
            });
        }
        let mut is_float = false;
        self.skip_digits(10);
        if self.peek(0) == Some('.') {
            is_float = true;
            self.i += 1;
            self.skip_digits(10);
        }
        if matches!(self.peek(0), Some('e' | 'E')) {
            let digit_at = if matches!(self.peek(1), Some('+' | '-')) { 2 } else { 1 };
            if self.peek(digit_at).is_some_and(|c| c.is_ascii_digit()) {
                is_float = true;
                self.i += digit_at;
                self.skip_digits(10);
            }
        }
        let text = &self.source[self.byte(start)..self.byte(self.i)];
        if is_float {
            match text.parse::<f64>() {
                Ok(x) if x.is_finite() => Ok(Value::Float(x)),
                _ => Err(self.error(start, "a finite float literal (write `inf` for infinity)", format!("`{text}`"))),
            }
        } else {
            text.parse::<i64>().map(Value::Int).map_err(|_| {
                self.error(start, "an integer literal that fits in 64 bits (at most 9223372036854775807)", {
                    format!("`{text}`")
                })
            })
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Parser
// ---------------------------------------------------------------------------------------------

struct Parser<'a> {
    source: &'a str,
    tokens: Vec<Token>,
    pos: usize,
    depth: usize,
}

impl Parser<'_> {
    fn origin(&self) -> Origin {
        Origin::Expression(self.source.to_string())
    }

    fn peek(&self) -> Token {
        // The lexer always ends the list with `End`, and `bump` never moves past it.
        self.tokens.get(self.pos).or(self.tokens.last()).copied().unwrap_or(Token {
            tok: Tok::End,
            offset: 0,
            start: self.source.len(),
            end: self.source.len(),
        })
    }

    fn bump(&mut self) -> Token {
        let t = self.peek();
        if t.tok != Tok::End {
            self.pos += 1;
        }
        t
    }

    fn text(&self, t: Token) -> &str {
        self.source.get(t.start..t.end).unwrap_or("")
    }

    fn describe(&self, t: Token) -> String {
        match t.tok {
            Tok::End => "end of input".to_string(),
            _ => format!("`{}`", self.text(t)),
        }
    }

    fn expected(&self, what: &str) -> ExprError {
        let t = self.peek();
        ExprError::Parse {
            origin: self.origin(),
            offset: t.offset,
            expected: what.to_string(),
            found: self.describe(t),
        }
    }

    fn expect(&mut self, tok: Tok, what: &str) -> Result<Token, ExprError> {
        if self.peek().tok == tok { Ok(self.bump()) } else { Err(self.expected(what)) }
    }

    fn enter(&mut self) -> Result<(), ExprError> {
        self.depth += 1;
        if self.depth > MAX_NESTING {
            return Err(ExprError::TooDeep { origin: self.origin(), offset: self.peek().offset, limit: MAX_NESTING });
        }
        Ok(())
    }

    /// Builds a node, enforcing the tree height limit; `offset` is where to report a violation.
    fn node(&self, kind: NodeKind, start: usize, end: usize, offset: usize) -> Result<Node, ExprError> {
        let mut node = Node { kind, start, end, height: 1 };
        node.height = 1 + node.children().iter().map(|c| c.height).max().unwrap_or(0);
        if node.height > MAX_TREE_HEIGHT {
            return Err(ExprError::TooDeep { origin: self.origin(), offset, limit: MAX_TREE_HEIGHT });
        }
        Ok(node)
    }

    /// `expr := or ( "?" expr ":" expr )?`
    fn expr(&mut self) -> Result<Node, ExprError> {
        self.enter()?;
        let cond = self.binary(1)?;
        let node = if self.peek().tok == Tok::Question {
            let q = self.bump();
            let then = self.expr()?;
            self.expect(Tok::Colon, "`:`")?;
            let other = self.expr()?;
            let (start, end) = (cond.start, other.end);
            self.node(NodeKind::Cond(Box::new(cond), Box::new(then), Box::new(other)), start, end, q.offset)?
        } else {
            cond
        };
        self.depth -= 1;
        Ok(node)
    }

    /// Precedence climbing over the left-associative binary operators.
    fn binary(&mut self, min_precedence: u8) -> Result<Node, ExprError> {
        let mut lhs = self.unary()?;
        loop {
            let t = self.peek();
            let Tok::Bin(op) = t.tok else { break };
            if op.precedence() < min_precedence {
                break;
            }
            self.bump();
            let rhs = self.binary(op.precedence() + 1)?;
            let (start, end) = (lhs.start, rhs.end);
            lhs = self.node(NodeKind::Binary(op, Box::new(lhs), Box::new(rhs)), start, end, t.offset)?;
        }
        Ok(lhs)
    }

    fn unary(&mut self) -> Result<Node, ExprError> {
        let t = self.peek();
        let op = match t.tok {
            Tok::Bin(BinOp::Sub) => UnOp::Neg,
            Tok::Not => UnOp::Not,
            Tok::Tilde => UnOp::BitNot,
            _ => return self.primary(),
        };
        self.bump();
        self.enter()?;
        let operand = self.unary()?;
        self.depth -= 1;
        let end = operand.end;
        self.node(NodeKind::Unary(op, Box::new(operand)), t.start, end, t.offset)
    }

    fn primary(&mut self) -> Result<Node, ExprError> {
        let t = self.peek();
        match t.tok {
            Tok::Lit(v) => {
                self.bump();
                self.node(NodeKind::Lit(v), t.start, t.end, t.offset)
            }
            Tok::Ident => {
                self.bump();
                let name = self.text(t).to_string();
                if self.peek().tok == Tok::LParen {
                    self.call(t, name)
                } else {
                    self.node(NodeKind::Var(name), t.start, t.end, t.offset)
                }
            }
            Tok::LParen => {
                self.bump();
                let mut inner = self.expr()?;
                let close = self.expect(Tok::RParen, "`)`")?;
                // The parentheses belong to the node's text, e.g. `9 / (3 - 3)` in messages.
                (inner.start, inner.end) = (t.start, close.end);
                Ok(inner)
            }
            _ => Err(self.expected("a value")),
        }
    }

    fn call(&mut self, name_token: Token, name: String) -> Result<Node, ExprError> {
        let Some((function, func, arity)) = Func::lookup(&name) else {
            return Err(ExprError::UnknownFunction { origin: self.origin(), offset: name_token.offset, name });
        };
        self.bump(); // `(`
        let mut args = Vec::new();
        let close = if self.peek().tok == Tok::RParen {
            self.bump()
        } else {
            loop {
                args.push(self.expr()?);
                match self.peek().tok {
                    Tok::Comma => {
                        self.bump();
                    }
                    Tok::RParen => break self.bump(),
                    _ => return Err(self.expected("`,` or `)`")),
                }
            }
        };
        if args.len() != arity {
            return Err(ExprError::Arity {
                origin: self.origin(),
                offset: name_token.offset,
                function,
                expected: arity,
                found: args.len(),
            });
        }
        self.node(NodeKind::Call(func, args), name_token.start, close.end, name_token.offset)
    }
}

// ---------------------------------------------------------------------------------------------
// Expressions
// ---------------------------------------------------------------------------------------------

/// A parsed expression: its source text and syntax tree.
#[derive(Clone, Debug, PartialEq)]
pub struct Expr {
    source: String,
    root: Node,
}

/// An evaluation failure before it is tied to its expression.
enum Fail {
    Unknown(String),
    At { start: usize, end: usize, kind: EvalErrorKind },
}

impl Fail {
    fn at(node: &Node, kind: EvalErrorKind) -> Fail {
        Fail::At { start: node.start, end: node.end, kind }
    }
}

impl Expr {
    /// Parses `source`; see the module documentation for the grammar.
    pub fn parse(source: &str) -> Result<Expr, ExprError> {
        let length = source.chars().count();
        if length > MAX_SOURCE_CHARS {
            return Err(ExprError::TooLong { origin: Origin::Expression(quote_prefix(source)), length });
        }
        let tokens = Lexer::new(source).tokens()?;
        let mut parser = Parser { source, tokens, pos: 0, depth: 0 };
        let root = parser.expr()?;
        if parser.peek().tok != Tok::End {
            return Err(parser.expected("an operator or end of input"));
        }
        Ok(Expr { source: source.to_string(), root })
    }

    /// The text the expression was parsed from.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// Evaluates the expression, reading variables from `env`.
    pub fn eval(&self, env: &dyn Env) -> Result<Value, ExprError> {
        eval_node(&self.root, env).map_err(|fail| self.error(fail, env))
    }

    /// Evaluates to an int in `0..=u32::MAX` (a bool gives 0 or 1).
    pub fn eval_u32(&self, env: &dyn Env) -> Result<u32, ExprError> {
        match self.eval(env)? {
            Value::Int(i) if u32::try_from(i).is_ok() => Ok(i as u32),
            Value::Bool(b) => Ok(u32::from(b)),
            v => Err(self.conversion(v, "a u32")),
        }
    }

    /// Evaluates to an int in `i32::MIN..=i32::MAX` (a bool gives 0 or 1).
    pub fn eval_i32(&self, env: &dyn Env) -> Result<i32, ExprError> {
        match self.eval(env)? {
            Value::Int(i) if i32::try_from(i).is_ok() => Ok(i as i32),
            Value::Bool(b) => Ok(i32::from(b)),
            v => Err(self.conversion(v, "an i32")),
        }
    }

    /// Evaluates to a non-negative int (a bool gives 0 or 1).
    pub fn eval_u64(&self, env: &dyn Env) -> Result<u64, ExprError> {
        match self.eval(env)? {
            Value::Int(i) if i >= 0 => Ok(i as u64),
            Value::Bool(b) => Ok(u64::from(b)),
            v => Err(self.conversion(v, "a u64")),
        }
    }

    /// Evaluates to an int or float, rounded to the nearest f32. Infinities pass; NaN, bools and
    /// finite values beyond the f32 range are errors.
    pub fn eval_f32(&self, env: &dyn Env) -> Result<f32, ExprError> {
        let v = self.eval(env)?;
        let x = match v {
            Value::Int(i) => i as f32,
            Value::Float(x) if !x.is_nan() => x as f32,
            _ => return Err(self.conversion(v, "an f32")),
        };
        if x.is_infinite() && !matches!(v, Value::Float(f) if f.is_infinite()) {
            return Err(self.conversion(v, "an f32 (the value is beyond the f32 range)"));
        }
        Ok(x)
    }

    /// Evaluates to a bool.
    pub fn eval_bool(&self, env: &dyn Env) -> Result<bool, ExprError> {
        match self.eval(env)? {
            Value::Bool(b) => Ok(b),
            v => Err(self.conversion(v, "a boolean")),
        }
    }

    /// The variables the expression reads (not function names), sorted and deduplicated.
    pub fn identifiers(&self) -> Vec<String> {
        let mut names = BTreeSet::new();
        self.root.collect_identifiers(&mut names);
        names.into_iter().collect()
    }

    fn origin(&self) -> Origin {
        Origin::Expression(self.source.clone())
    }

    fn conversion(&self, value: Value, target: &'static str) -> ExprError {
        ExprError::Eval { origin: self.origin(), at: None, kind: EvalErrorKind::Conversion { value, target } }
    }

    fn error(&self, fail: Fail, env: &dyn Env) -> ExprError {
        match fail {
            Fail::Unknown(name) => {
                let mut known = env.names();
                known.sort();
                known.dedup();
                let more = known.len().saturating_sub(MAX_LISTED_NAMES);
                known.truncate(MAX_LISTED_NAMES);
                ExprError::UnknownIdentifier { origin: self.origin(), name, known, more }
            }
            Fail::At { start, end, kind } => {
                let whole = self.source.trim();
                let at = self.source.get(start..end).map(str::trim).filter(|s| *s != whole).map(str::to_string);
                ExprError::Eval { origin: self.origin(), at, kind }
            }
        }
    }
}

impl fmt::Display for Expr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.source)
    }
}

impl std::str::FromStr for Expr {
    type Err = ExprError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Expr::parse(s)
    }
}

// ---------------------------------------------------------------------------------------------
// Evaluation
// ---------------------------------------------------------------------------------------------

fn expect_bool(node: &Node, env: &dyn Env, context: &'static str) -> Result<bool, Fail> {
    match eval_node(node, env)? {
        Value::Bool(b) => Ok(b),
        found => Err(Fail::at(node, EvalErrorKind::ExpectedBool { context, found })),
    }
}

/// Recursion is bounded by the tree height limit the parser enforces.
fn eval_node(node: &Node, env: &dyn Env) -> Result<Value, Fail> {
    match &node.kind {
        NodeKind::Lit(v) => Ok(*v),
        NodeKind::Var(name) => env.get(name).ok_or_else(|| Fail::Unknown(name.clone())),
        NodeKind::Unary(op, x) => {
            let v = eval_node(x, env)?;
            unary(*op, v).map_err(|kind| Fail::at(node, kind))
        }
        NodeKind::Binary(BinOp::And, a, b) => Ok(Value::Bool(
            expect_bool(a, env, "the left side of `&&`")? && expect_bool(b, env, "the right side of `&&`")?,
        )),
        NodeKind::Binary(BinOp::Or, a, b) => Ok(Value::Bool(
            expect_bool(a, env, "the left side of `||`")? || expect_bool(b, env, "the right side of `||`")?,
        )),
        NodeKind::Binary(op, a, b) => {
            let lhs = eval_node(a, env)?;
            let rhs = eval_node(b, env)?;
            binary(*op, lhs, rhs).map_err(|kind| Fail::at(node, kind))
        }
        NodeKind::Cond(c, a, b) => {
            if expect_bool(c, env, "the condition of `?:`")? {
                eval_node(a, env)
            } else {
                eval_node(b, env)
            }
        }
        NodeKind::Call(func, args) => {
            let values = args.iter().map(|a| eval_node(a, env)).collect::<Result<Vec<_>, _>>()?;
            call(*func, &values).map_err(|kind| Fail::at(node, kind))
        }
    }
}

fn float_result(x: f64, operation: impl FnOnce() -> String) -> Result<Value, EvalErrorKind> {
    if x.is_nan() { Err(EvalErrorKind::NotANumber { operation: operation() }) } else { Ok(Value::Float(x)) }
}

fn unary(op: UnOp, v: Value) -> Result<Value, EvalErrorKind> {
    match (op, v) {
        (UnOp::Neg, Value::Int(i)) => {
            i.checked_neg().map(Value::Int).ok_or_else(|| EvalErrorKind::Overflow { operation: format!("-({i})") })
        }
        (UnOp::Neg, Value::Float(x)) => float_result(-x, || format!("-({x:?})")),
        (UnOp::Not, Value::Bool(b)) => Ok(Value::Bool(!b)),
        (UnOp::Not, found) => Err(EvalErrorKind::ExpectedBool { context: "the operand of `!`", found }),
        (UnOp::BitNot, Value::Int(i)) => Ok(Value::Int(!i)),
        (UnOp::Neg, found) => {
            Err(EvalErrorKind::Type { message: format!("unary `-` needs an int or float, found {}", found.describe()) })
        }
        (UnOp::BitNot, found) => {
            Err(EvalErrorKind::Type { message: format!("`~` needs an int, found {}", found.describe()) })
        }
    }
}

fn binary(op: BinOp, a: Value, b: Value) -> Result<Value, EvalErrorKind> {
    let operation = || format!("{a} {} {b}", op.symbol());
    let type_error = |needs: &str| {
        let hint = match (op, a, b) {
            (BinOp::BitAnd | BinOp::BitOr, Value::Bool(_), Value::Bool(_)) => {
                format!(" (use `{0}{0}` for booleans)", op.symbol())
            }
            _ => String::new(),
        };
        EvalErrorKind::Type {
            message: format!("`{}` needs {needs}, found {} and {}{hint}", op.symbol(), a.describe(), b.describe()),
        }
    };
    match op {
        BinOp::Eq | BinOp::Ne => {
            let equal = match (a, b) {
                (Value::Int(x), Value::Int(y)) => x == y,
                (Value::Bool(x), Value::Bool(y)) => x == y,
                (Value::Bool(_), _) | (_, Value::Bool(_)) => return Err(type_error("operands of the same type")),
                _ => {
                    if a.is_nan() || b.is_nan() {
                        return Err(EvalErrorKind::NotANumber { operation: operation() });
                    }
                    a.as_f64() == b.as_f64()
                }
            };
            Ok(Value::Bool(equal == (op == BinOp::Eq)))
        }
        BinOp::Lt | BinOp::Le | BinOp::Gt | BinOp::Ge => {
            let ordering = match (a, b) {
                (Value::Int(x), Value::Int(y)) => x.cmp(&y),
                _ => {
                    let (Some(x), Some(y)) = (a.as_f64(), b.as_f64()) else {
                        return Err(type_error("int or float operands"));
                    };
                    x.partial_cmp(&y).ok_or_else(|| EvalErrorKind::NotANumber { operation: operation() })?
                }
            };
            Ok(Value::Bool(match op {
                BinOp::Lt => ordering.is_lt(),
                BinOp::Le => ordering.is_le(),
                BinOp::Gt => ordering.is_gt(),
                _ => ordering.is_ge(),
            }))
        }
        BinOp::Add | BinOp::Sub | BinOp::Mul | BinOp::Div => match (a, b) {
            (Value::Int(x), Value::Int(y)) => {
                let result = match op {
                    BinOp::Add => x.checked_add(y),
                    BinOp::Sub => x.checked_sub(y),
                    BinOp::Mul => x.checked_mul(y),
                    _ => return int_div(x, y, op, operation),
                };
                result.map(Value::Int).ok_or_else(|| EvalErrorKind::Overflow { operation: operation() })
            }
            _ => {
                let (Some(x), Some(y)) = (a.as_f64(), b.as_f64()) else {
                    return Err(type_error("int or float operands"));
                };
                let r = match op {
                    BinOp::Add => x + y,
                    BinOp::Sub => x - y,
                    BinOp::Mul => x * y,
                    _ => x / y,
                };
                float_result(r, operation)
            }
        },
        _ => {
            let (Value::Int(x), Value::Int(y)) = (a, b) else {
                return Err(type_error("int operands"));
            };
            match op {
                BinOp::Rem => int_div(x, y, op, operation),
                BinOp::BitAnd => Ok(Value::Int(x & y)),
                BinOp::BitOr => Ok(Value::Int(x | y)),
                BinOp::BitXor => Ok(Value::Int(x ^ y)),
                _ => {
                    if !(0..63).contains(&y) {
                        return Err(EvalErrorKind::ShiftOutOfRange { operation: operation() });
                    }
                    if op == BinOp::Shr {
                        Ok(Value::Int(x >> y))
                    } else {
                        // 1 << y fits for y <= 62; the multiplication catches overflow exactly.
                        x.checked_mul(1i64 << y)
                            .map(Value::Int)
                            .ok_or_else(|| EvalErrorKind::Overflow { operation: operation() })
                    }
                }
            }
        }
    }
}

/// Integer `/` or `%`: both operands non-negative, divisor non-zero.
fn int_div(x: i64, y: i64, op: BinOp, operation: impl FnOnce() -> String) -> Result<Value, EvalErrorKind> {
    if y == 0 {
        return Err(EvalErrorKind::DivisionByZero { operation: operation() });
    }
    if x < 0 || y < 0 {
        return Err(EvalErrorKind::NegativeOperand { operation: operation() });
    }
    Ok(Value::Int(if op == BinOp::Div { x / y } else { x % y }))
}

fn call(func: Func, args: &[Value]) -> Result<Value, EvalErrorKind> {
    let function = func.name();
    let rendered = || {
        let list = args.iter().map(Value::to_string).collect::<Vec<_>>().join(", ");
        format!("{function}({list})")
    };
    let fail = |message: String| EvalErrorKind::Function { function, message };
    let wrong_types = |wanted: &str| {
        let found = args.iter().map(Value::describe).collect::<Vec<_>>().join(", ");
        fail(format!("expected {wanted}, found {found}"))
    };
    let ints = || -> Result<Vec<i64>, EvalErrorKind> {
        args.iter()
            .map(|v| match v {
                Value::Int(i) => Ok(*i),
                _ => Err(wrong_types(if args.len() == 1 { "an int argument" } else { "int arguments" })),
            })
            .collect()
    };
    let floats = || -> Result<Vec<f64>, EvalErrorKind> {
        let xs = args.iter().map(Value::as_f64).collect::<Option<Vec<_>>>().ok_or_else(|| {
            wrong_types(if args.len() == 1 { "an int or float argument" } else { "int or float arguments" })
        })?;
        if xs.iter().any(|x| x.is_nan()) {
            return Err(EvalErrorKind::NotANumber { operation: rendered() });
        }
        Ok(xs)
    };
    match func {
        Func::Min | Func::Max => {
            if let [Value::Int(a), Value::Int(b)] = *args {
                return Ok(Value::Int(if func == Func::Min { a.min(b) } else { a.max(b) }));
            }
            let xs = floats()?;
            Ok(Value::Float(if func == Func::Min { xs[0].min(xs[1]) } else { xs[0].max(xs[1]) }))
        }
        Func::Clamp => {
            if let [Value::Int(x), Value::Int(lo), Value::Int(hi)] = *args {
                if lo > hi {
                    return Err(fail(format!("the lower bound exceeds the upper bound in {}", rendered())));
                }
                return Ok(Value::Int(x.clamp(lo, hi)));
            }
            let xs = floats()?;
            if xs[1] > xs[2] {
                return Err(fail(format!("the lower bound exceeds the upper bound in {}", rendered())));
            }
            Ok(Value::Float(xs[0].clamp(xs[1], xs[2])))
        }
        Func::DivCeil | Func::AlignUp => {
            let v = ints()?;
            let (a, b) = (v[0], v[1]);
            if func == Func::DivCeil && b == 0 {
                return Err(EvalErrorKind::DivisionByZero { operation: rendered() });
            }
            if a < 0 {
                return Err(fail(format!("the first argument must be non-negative, found {}", rendered())));
            }
            if b <= 0 {
                let what = if func == Func::DivCeil { "the divisor" } else { "the alignment" };
                return Err(fail(format!("{what} must be positive, found {}", rendered())));
            }
            let quotient = a / b + i64::from(a % b != 0);
            if func == Func::DivCeil {
                Ok(Value::Int(quotient))
            } else {
                quotient.checked_mul(b).map(Value::Int).ok_or_else(|| EvalErrorKind::Overflow { operation: rendered() })
            }
        }
        Func::Log2 | Func::Pow2Ceil => {
            let x = ints()?[0];
            if x < 1 {
                return Err(fail(format!("the argument must be at least 1, found {}", rendered())));
            }
            if func == Func::Log2 {
                return Ok(Value::Int(i64::from(63 - x.leading_zeros())));
            }
            // x <= i64::MAX, so the u64 power of two (at most 2^63) cannot overflow.
            let p = (x as u64).next_power_of_two();
            i64::try_from(p).map(Value::Int).map_err(|_| EvalErrorKind::Overflow { operation: rendered() })
        }
        Func::Float => match args[0] {
            Value::Bool(_) => Err(wrong_types("an int or float argument")),
            v => float_result(v.as_f64().unwrap_or(f64::NAN), rendered),
        },
        Func::Int => match args[0] {
            Value::Int(i) => Ok(Value::Int(i)),
            Value::Float(x) => {
                let t = x.trunc();
                // -2^63 is exactly representable; 2^63 is the first value past i64::MAX.
                if t.is_finite() && (-9_223_372_036_854_775_808.0..9_223_372_036_854_775_808.0).contains(&t) {
                    Ok(Value::Int(t as i64))
                } else {
                    Err(fail(format!("{} is not finite or outside the i64 range", rendered())))
                }
            }
            Value::Bool(_) => Err(wrong_types("an int or float argument")),
        },
        Func::F32Bits => match args[0] {
            Value::Int(i) => Ok(Value::Int(i64::from((i as f32).to_bits()))),
            Value::Float(x) if x.is_nan() => Ok(Value::Int(0x7fc0_0000)),
            Value::Float(x) => Ok(Value::Int(i64::from((x as f32).to_bits()))),
            Value::Bool(_) => Err(wrong_types("an int or float argument")),
        },
        Func::F16Bits => match args[0] {
            Value::Int(i) => Ok(Value::Int(i64::from(f64_to_f16_bits(i as f64)))),
            Value::Float(x) => Ok(Value::Int(i64::from(f64_to_f16_bits(x)))),
            Value::Bool(_) => Err(wrong_types("an int or float argument")),
        },
        Func::Select => match args[0] {
            Value::Bool(c) => Ok(if c { args[1] } else { args[2] }),
            _ => Err(fail(format!("the first argument must be a bool, found {}", args[0].describe()))),
        },
    }
}

/// The IEEE 754 binary16 bit pattern nearest to `x`, ties to even; overflow gives infinity and
/// every NaN gives the quiet NaN `0x7e00`. Rounds directly from f64 (no double rounding).
pub(crate) fn f64_to_f16_bits(x: f64) -> u16 {
    const MANTISSA_BITS: u32 = 52;
    const MANTISSA_MASK: u64 = (1 << MANTISSA_BITS) - 1;
    let bits = x.to_bits();
    let sign = ((bits >> 48) & 0x8000) as u16;
    let biased = ((bits >> MANTISSA_BITS) & 0x7ff) as i32;
    let mantissa = bits & MANTISSA_MASK;
    if biased == 0x7ff {
        return if mantissa != 0 { 0x7e00 } else { sign | 0x7c00 };
    }
    if biased == 0 {
        // Zero or an f64 subnormal, far below half the smallest f16 subnormal.
        return sign;
    }
    let exponent = biased - 1023;
    if exponent > 15 {
        return sign | 0x7c00;
    }
    // Round `significand` right by `shift` bits, ties to even.
    let round = |significand: u64, shift: u32| -> u64 {
        let kept = significand >> shift;
        let rest = significand & ((1u64 << shift) - 1);
        let half = 1u64 << (shift - 1);
        if rest > half || (rest == half && kept & 1 == 1) { kept + 1 } else { kept }
    };
    if exponent >= -14 {
        // Normal: a carry out of the mantissa bumps the exponent, up to infinity (0x7c00).
        let biased_significand = (((exponent + 15) as u64) << MANTISSA_BITS) | mantissa;
        return sign | round(biased_significand, MANTISSA_BITS - 10) as u16;
    }
    if exponent < -25 {
        // Below 2^-25, half the smallest subnormal: rounds to zero.
        return sign;
    }
    // Subnormal: the value in units of 2^-24 is significand * 2^(exponent - 28).
    let significand = (1u64 << MANTISSA_BITS) | mantissa;
    let shift = (28 - exponent) as u32; // 43..=53
    sign | round(significand, shift) as u16
}

// ---------------------------------------------------------------------------------------------
// Definitions
// ---------------------------------------------------------------------------------------------

/// An ordered list of definitions `name = expr`, each able to use the ones before it.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Lets(Vec<(String, Expr)>);

fn is_identifier(s: &str) -> bool {
    let mut chars = s.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

impl Lets {
    /// Parses definitions of the form `name = expr`. A name may not be defined twice in the list,
    /// nor be one of the words `true`, `false`, `inf`.
    pub fn parse<S: AsRef<str>>(defs: &[S]) -> Result<Lets, ExprError> {
        let mut lets: Vec<(String, Expr)> = Vec::with_capacity(defs.len());
        for def in defs {
            let text = def.as_ref();
            let bad = |message: String| ExprError::Definition { text: quote_prefix(text), message };
            let Some(eq) = text.find('=') else {
                return Err(bad("expected `name = expression`".to_string()));
            };
            let name = text[..eq].trim();
            let rest = &text[eq + 1..];
            if rest.starts_with('=') || name.is_empty() {
                return Err(bad("expected `name = expression`".to_string()));
            }
            if !is_identifier(name) {
                return Err(bad(format!("`{name}` is not a valid name (expected [A-Za-z_][A-Za-z0-9_]*)")));
            }
            if matches!(name, "true" | "false" | "inf") {
                return Err(bad(format!("`{name}` is a reserved word")));
            }
            if lets.iter().any(|(n, _)| n == name) {
                return Err(bad(format!("`{name}` is already defined by an earlier definition")));
            }
            // Offsets in errors count from the start of the definition text.
            let leading = rest.len() - rest.trim_start().len();
            let shift = text[..eq + 1 + leading].chars().count();
            let mut expr = Expr::parse(rest.trim_start()).map_err(|e| e.in_definition(text, shift))?;
            // Node spans never cover trailing whitespace, so trimming the source keeps them valid.
            expr.source.truncate(expr.source.trim_end().len());
            lets.push((name.to_string(), expr));
        }
        Ok(Lets(lets))
    }

    /// Evaluates the definitions in order, inserting each result into `env` (a definition may
    /// shadow a variable already in `env`). On error, the definitions before the failing one
    /// have been inserted.
    pub fn eval_into(&self, env: &mut BTreeMap<String, Value>) -> Result<(), ExprError> {
        for (name, expr) in &self.0 {
            let value = expr.eval(&*env).map_err(|e| e.in_definition(&format!("{name} = {}", expr.source()), 0))?;
            env.insert(name.clone(), value);
        }
        Ok(())
    }

    /// The defined names, in order.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.0.iter().map(|(name, _)| name.as_str())
    }

    /// The definitions, in order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &Expr)> {
        self.0.iter().map(|(name, expr)| (name.as_str(), expr))
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(vars: &[(&str, Value)]) -> BTreeMap<String, Value> {
        vars.iter().map(|(k, v)| (k.to_string(), *v)).collect()
    }

    fn eval_in(src: &str, e: &BTreeMap<String, Value>) -> Result<Value, ExprError> {
        Expr::parse(src)?.eval(e)
    }

    fn ev(src: &str) -> Value {
        eval_in(src, &BTreeMap::new()).unwrap_or_else(|e| panic!("{src}: {e}"))
    }

    fn err(src: &str) -> String {
        err_in(src, &BTreeMap::new())
    }

    fn err_in(src: &str, e: &BTreeMap<String, Value>) -> String {
        match eval_in(src, e) {
            Ok(v) => panic!("{src}: expected an error, got {v}"),
            Err(e) => {
                let msg = e.to_string();
                assert!(msg.starts_with(&format!("expression `{}`: ", quote_prefix(src))), "{msg}");
                msg
            }
        }
    }

    fn int(i: i64) -> Value {
        Value::Int(i)
    }

    fn float(x: f64) -> Value {
        Value::Float(x)
    }

    #[test]
    fn literals() {
        assert_eq!(ev("42"), int(42));
        assert_eq!(ev("0x7fffffffffffffff"), int(i64::MAX));
        assert_eq!(ev("0XfF"), int(255));
        assert_eq!(ev("9223372036854775807"), int(i64::MAX));
        assert_eq!(ev("1.5"), float(1.5));
        assert_eq!(ev("1e-3"), float(1e-3));
        assert_eq!(ev("1E+3"), float(1000.0));
        assert_eq!(ev("2."), float(2.0));
        assert_eq!(ev(".5"), float(0.5));
        assert_eq!(ev("2.e3"), float(2000.0));
        assert_eq!(ev("true"), Value::Bool(true));
        assert_eq!(ev("false"), Value::Bool(false));
        assert_eq!(ev("inf"), float(f64::INFINITY));
        assert_eq!(ev("-inf"), float(f64::NEG_INFINITY));
        assert_eq!(ev("  7  "), int(7));
        assert_eq!(ev("-9223372036854775807 - 1"), int(i64::MIN));
    }

    #[test]
    fn literal_errors() {
        assert!(err("9223372036854775808").contains("fits in 64 bits"));
        assert!(err("0x8000000000000000").contains("fits in 64 bits"));
        assert!(err("0x").contains("expected hex digits after `0x` at offset 2, found end of input"));
        assert!(err("0xg").contains("expected hex digits after `0x` at offset 2, found 'g'"));
        assert!(err("1e999").contains("finite float literal"));
        // `1e` is the int 1 followed by the identifier `e`.
        assert!(err("1e").contains("expected an operator or end of input at offset 1, found `e`"));
        assert!(err("1.5.2").contains("at offset 3, found `.2`"));
        assert!(err("a # b").contains("at offset 2, found character '#'"));
        assert!(err("a = b").contains("at offset 2, found '=' (use `==` to compare)"));
        assert!(err("x . y").contains("offset 2"));
        assert!(err("é").contains("at offset 0, found character 'é'"));
        // Offsets count characters, not bytes.
        let e = err("\u{a0}\u{a0}\u{a0}1 +");
        assert!(e.contains("expected a value at offset 6, found end of input"), "{e}");
    }

    #[test]
    fn value_display() {
        assert_eq!(int(-3).to_string(), "-3");
        assert_eq!(float(1.0).to_string(), "1.0");
        assert_eq!(float(1.5).to_string(), "1.5");
        assert_eq!(float(f64::NEG_INFINITY).to_string(), "-inf");
        assert_eq!(Value::Bool(true).to_string(), "true");
        assert_eq!(int(1).type_name(), "int");
        assert_eq!(float(1.0).type_name(), "float");
        assert_eq!(Value::Bool(false).type_name(), "bool");
        assert_eq!(Value::from(3i64), int(3));
        assert_eq!(Value::from(0.5), float(0.5));
        assert_eq!(Value::from(true), Value::Bool(true));
    }

    #[test]
    fn precedence_and_associativity() {
        assert_eq!(ev("1 - 2 - 3"), int(-4));
        assert_eq!(ev("2 * 3 + 4"), int(10));
        assert_eq!(ev("2 + 3 * 4"), int(14));
        assert_eq!(ev("1 << 2 + 1"), int(8));
        assert_eq!(ev("100 / 10 / 5"), int(2));
        assert_eq!(ev("100 / 10 * 5"), int(50));
        assert_eq!(ev("17 % 5 * 2"), int(4));
        assert_eq!(ev("64 >> 2 >> 1"), int(8));
        assert_eq!(ev("(1 - 2) - 3"), int(-4));
        assert_eq!(ev("1 - (2 - 3)"), int(2));
        assert_eq!(ev("-2 * 3"), int(-6));
        assert_eq!(ev("- -2"), int(2));
        assert_eq!(ev("--2"), int(2));
        assert_eq!(ev("~0"), int(-1));
        assert_eq!(ev("!true || true"), Value::Bool(true));
        assert_eq!(ev("!(true || true)"), Value::Bool(false));
        assert_eq!(ev("12 | 3 ^ 5 & 6"), int(15)); // 12 | (3 ^ (5 & 6))
    }

    #[test]
    fn bitand_of_bool_is_error() {
        // `6 & 3 == 3` is `6 & (3 == 3)`: an int and a bool.
        let e = err("6 & (3 == 3)");
        assert!(e.contains("`&` needs int operands, found int 6 and bool true"), "{e}");
        let e = err("true & false");
        assert!(e.contains("(use `&&` for booleans)"), "{e}");
    }

    #[test]
    fn precedence_of_comparisons_and_logic() {
        let e = env(&[("a", int(1)), ("b", int(2))]);
        assert_eq!(eval_in("a < b == b > a", &e).unwrap(), Value::Bool(true));
        assert_eq!(eval_in("a + 1 == b && b << 1 == 4", &e).unwrap(), Value::Bool(true));
        assert_eq!(eval_in("false && true || true", &e).unwrap(), Value::Bool(true));
        assert_eq!(eval_in("true || true && false", &e).unwrap(), Value::Bool(true));
        assert_eq!(eval_in("(true || true) && false", &e).unwrap(), Value::Bool(false));
        assert!(eval_in("a | b == 3", &e).unwrap_err().to_string().contains("`|` needs int operands"));
        assert_eq!(eval_in("(a | b) == 3", &e).unwrap(), Value::Bool(true));
    }

    #[test]
    fn ternary() {
        let e = env(&[("a", Value::Bool(false)), ("c", Value::Bool(true)), ("x", int(0))]);
        assert_eq!(eval_in("a ? 1 : c ? 2 : 3", &e).unwrap(), int(2));
        assert_eq!(eval_in("c ? 1 : c ? 2 : 3", &e).unwrap(), int(1));
        assert_eq!(eval_in("a ? 1 : a ? 2 : 3", &e).unwrap(), int(3));
        assert_eq!(eval_in("c ? a ? 1 : 2 : 3", &e).unwrap(), int(2));
        assert_eq!(eval_in("x > 0 ? 10 / x : 0", &e).unwrap(), int(0));
        assert_eq!(eval_in("c ? 1 : 2 + 3", &e).unwrap(), int(1));
        assert_eq!(eval_in("(a ? 1 : 2) + 3", &e).unwrap(), int(5));
        assert_eq!(eval_in("x == 0 || x == 1 ? 7 : 8", &e).unwrap(), int(7));
        let m = err_in("x ? 1 : 2", &e);
        assert!(m.contains("expected a boolean for the condition of `?:`, found int 0 (in `x`)"), "{m}");
        assert!(err_in("c ? 1", &e).contains("expected `:` at offset 5, found end of input"));
    }

    #[test]
    fn manifest_examples() {
        let e = env(&[
            ("KV", int(1000)),
            ("Bc", int(64)),
            ("T", int(3)),
            ("H", int(32)),
            ("Hkv", int(8)),
            ("B", int(2)),
            ("D", int(128)),
            ("has_sinks", Value::Bool(true)),
            ("scale", float(0.125)),
            ("softcap", float(0.0)),
            ("k_stride_pos", int(1024)),
            ("compute_units", int(132)),
        ]);
        let check = |src: &str, want: Value| assert_eq!(eval_in(src, &e).unwrap(), want, "{src}");
        check("div_ceil(KV, Bc)", int(16));
        check("T * H * D * 4", int(3 * 32 * 128 * 4));
        check("has_sinks ? (1 << 24) | log2(H) : log2(H)", int((1 << 24) | 5));
        check("scale / (softcap > 0.0 ? softcap : 1.0)", float(0.125));
        check("KV % Bc == 0 && k_stride_pos % 8 == 0", Value::Bool(false));
        check("min(max(compute_units / (Hkv * B), 1), 16)", int(8));
    }

    #[test]
    fn arithmetic_and_promotion() {
        assert_eq!(ev("7 / 2"), int(3));
        assert_eq!(ev("7 % 2"), int(1));
        assert_eq!(ev("0 / 5"), int(0));
        assert_eq!(ev("7 / 2.0"), float(3.5));
        assert_eq!(ev("1 + 0.5"), float(1.5));
        assert_eq!(ev("0.5 * 4"), float(2.0));
        assert_eq!(ev("3 - 0.5"), float(2.5));
        assert_eq!(ev("-1.0 / 4"), float(-0.25));
        assert_eq!(ev("1.0 / 0"), float(f64::INFINITY));
        assert_eq!(ev("1 < 1.5"), Value::Bool(true));
        assert_eq!(ev("2 >= 2.0"), Value::Bool(true));
        assert_eq!(ev("2 == 2.0"), Value::Bool(true));
        assert_eq!(ev("2 != 2.5"), Value::Bool(true));
        assert_eq!(ev("true == false"), Value::Bool(false));
        assert_eq!(ev("true != false"), Value::Bool(true));
        assert_eq!(ev("-8 >> 1"), int(-4));
        assert_eq!(ev("-1 << 62"), int(-(1 << 62)));
        assert_eq!(ev("-2 << 62"), int(i64::MIN));
        assert_eq!(ev("1 << 62"), int(1 << 62));
        assert_eq!(ev("5 ^ 3"), int(6));
        assert_eq!(ev("-inf < 0"), Value::Bool(true));
        assert_eq!(ev("inf > 9223372036854775807"), Value::Bool(true));
    }

    #[test]
    fn overflow_errors() {
        let e = err("9223372036854775807 + 1");
        assert!(e.ends_with(": integer overflow in 9223372036854775807 + 1"), "{e}");
        let e = err("-9223372036854775807 - 2");
        assert!(e.contains("integer overflow in -9223372036854775807 - 2"), "{e}");
        let big = env(&[("T", int(1 << 32)), ("H", int(1 << 32)), ("D", int(2))]);
        let e = err_in("T * H * D", &big);
        assert!(e.contains("integer overflow in 4294967296 * 4294967296 (in `T * H`)"), "{e}");
        let e = err("2 << 62");
        assert!(e.contains("integer overflow in 2 << 62"), "{e}");
        let e = err("-3 << 62");
        assert!(e.contains("integer overflow in -3 << 62"), "{e}");
        let e = err("1 << 31 << 31 << 1");
        assert!(e.contains("integer overflow in 4611686018427387904 << 1"), "{e}");
        let e = err("-(-9223372036854775807 - 1)");
        assert!(e.contains("integer overflow in -(-9223372036854775808)"), "{e}");
    }

    #[test]
    fn division_errors() {
        let e = err("7 / 0");
        assert!(e.ends_with(": division by zero in 7 / 0"), "{e}");
        assert!(err("7 % 0").contains("division by zero in 7 % 0"));
        let e = err("-7 / 2");
        assert!(e.contains("negative operand in -7 / 2 (integer `/` and `%` need non-negative operands)"), "{e}");
        assert!(err("7 / -2").contains("negative operand in 7 / -2"));
        assert!(err("-7 % 2").contains("negative operand in -7 % 2"));
        assert!(err("1 + (9 / (3 - 3))").contains("division by zero in 9 / 0 (in `(9 / (3 - 3))`)"));
    }

    #[test]
    fn shift_errors() {
        assert!(err("1 << 63").contains("shift count out of range in 1 << 63 (it must be 0..=62)"));
        assert!(err("1 << -1").contains("shift count out of range in 1 << -1"));
        assert!(err("1 >> 64").contains("shift count out of range in 1 >> 64"));
        assert!(err("1.0 << 1").contains("`<<` needs int operands, found float 1.0 and int 1"));
    }

    #[test]
    fn float_type_errors_and_nan() {
        assert!(err("5.0 % 2").contains("`%` needs int operands, found float 5.0 and int 2"));
        assert!(err("1.5 | 1").contains("`|` needs int operands"));
        assert!(err("1 ^ 1.5").contains("`^` needs int operands"));
        assert!(err("~1.5").contains("`~` needs an int, found float 1.5"));
        assert!(err("-true").contains("unary `-` needs an int or float, found bool true"));
        assert!(err("true + 1").contains("`+` needs int or float operands, found bool true and int 1"));
        assert!(err("true < false").contains("`<` needs int or float operands"));
        assert!(err("true == 1").contains("`==` needs operands of the same type, found bool true and int 1"));
        assert!(err("inf - inf").contains("not a number (NaN) in inf - inf"));
        assert!(err("0 * inf").contains("not a number (NaN) in 0 * inf"));
        assert!(err("0.0 / 0.0").contains("NaN"));
        let e = env(&[("n", float(f64::NAN))]);
        assert!(err_in("n < 1", &e).contains("NaN"));
        assert!(err_in("n == n", &e).contains("NaN"));
        assert!(err_in("-n", &e).contains("NaN"));
        assert!(err_in("min(n, 1)", &e).contains("not a number (NaN) in min(NaN, 1)"));
        // A NaN variable by itself is passed through.
        assert!(eval_in("n", &e).unwrap().is_nan());
    }

    #[test]
    fn boolean_operators_need_bools() {
        let e = err("1 && true");
        assert!(e.contains("expected a boolean for the left side of `&&`, found int 1 (in `1`)"), "{e}");
        assert!(err("false || 2").contains("expected a boolean for the right side of `||`, found int 2"));
        assert!(err("!1").contains("expected a boolean for the operand of `!`, found int 1"));
        assert!(err("1.0 ? 1 : 2").contains("expected a boolean for the condition of `?:`, found float 1.0"));
    }

    #[test]
    fn short_circuit() {
        let e = env(&[("x", int(0))]);
        assert_eq!(eval_in("x != 0 && 10 / x > 1", &e).unwrap(), Value::Bool(false));
        assert_eq!(eval_in("x == 0 || 10 / x > 1", &e).unwrap(), Value::Bool(true));
        assert_eq!(eval_in("false && undefined_var", &e).unwrap(), Value::Bool(false));
        assert_eq!(eval_in("true || 1", &e).unwrap(), Value::Bool(true));
        assert_eq!(eval_in("true ? 1 : missing", &e).unwrap(), int(1));
        assert_eq!(eval_in("false ? 1 << 99 : 2", &e).unwrap(), int(2));
        // The other side is evaluated when needed.
        assert!(err_in("x == 0 && 10 / x > 1", &e).contains("division by zero in 10 / 0"));
        // `select` evaluates both branches.
        assert!(err_in("select(x > 0, 10 / x, 0)", &e).contains("division by zero in 10 / 0"));
    }

    #[test]
    fn functions() {
        assert_eq!(ev("min(3, 5)"), int(3));
        assert_eq!(ev("max(3, 5)"), int(5));
        assert_eq!(ev("min(3, 2.5)"), float(2.5));
        assert_eq!(ev("max(3, 2.5)"), float(3.0));
        assert_eq!(ev("min(-inf, 0)"), float(f64::NEG_INFINITY));
        assert_eq!(ev("div_ceil(10, 3)"), int(4));
        assert_eq!(ev("div_ceil(9, 3)"), int(3));
        assert_eq!(ev("div_ceil(0, 3)"), int(0));
        assert_eq!(ev("div_ceil(9223372036854775807, 1)"), int(i64::MAX));
        assert_eq!(ev("div_ceil(9223372036854775807, 2)"), int(1 << 62));
        assert_eq!(ev("align_up(10, 8)"), int(16));
        assert_eq!(ev("align_up(16, 8)"), int(16));
        assert_eq!(ev("align_up(0, 8)"), int(0));
        assert_eq!(ev("align_up(5, 3)"), int(6));
        assert_eq!(ev("log2(1)"), int(0));
        assert_eq!(ev("log2(2)"), int(1));
        assert_eq!(ev("log2(3)"), int(1));
        assert_eq!(ev("log2(1024)"), int(10));
        assert_eq!(ev("log2(9223372036854775807)"), int(62));
        assert_eq!(ev("pow2_ceil(1)"), int(1));
        assert_eq!(ev("pow2_ceil(5)"), int(8));
        assert_eq!(ev("pow2_ceil(64)"), int(64));
        assert_eq!(ev("pow2_ceil(4611686018427387904)"), int(1 << 62));
        assert_eq!(ev("float(3)"), float(3.0));
        assert_eq!(ev("float(2.5)"), float(2.5));
        assert_eq!(ev("int(2.9)"), int(2));
        assert_eq!(ev("int(-2.9)"), int(-2));
        assert_eq!(ev("int(7)"), int(7));
        assert_eq!(ev("int(-9223372036854775808.0)"), int(i64::MIN));
        assert_eq!(ev("int(9223372036854774784.0)"), int(9_223_372_036_854_774_784));
        assert_eq!(ev("f32_bits(1.0)"), int(0x3f80_0000));
        assert_eq!(ev("f32_bits(1)"), int(0x3f80_0000));
        assert_eq!(ev("f32_bits(-2.0)"), int(0xc000_0000));
        assert_eq!(ev("f32_bits(0.1)"), int(0x3dcc_cccd));
        assert_eq!(ev("f32_bits(inf)"), int(0x7f80_0000));
        assert_eq!(ev("f32_bits(1e300)"), int(0x7f80_0000));
        assert_eq!(ev("f32_bits(16777217)"), int(0x4b80_0000)); // 2^24 + 1 ties to even
        assert_eq!(ev("f16_bits(1.0)"), int(0x3c00));
        assert_eq!(ev("f16_bits(1)"), int(0x3c00));
        assert_eq!(ev("f16_bits(-2)"), int(0xc000));
        assert_eq!(ev("clamp(5, 0, 3)"), int(3));
        assert_eq!(ev("clamp(-5, 0, 3)"), int(0));
        assert_eq!(ev("clamp(2, 0, 3)"), int(2));
        assert_eq!(ev("clamp(2.5, 0, 3)"), float(2.5));
        assert_eq!(ev("clamp(5, 0, 3.5)"), float(3.5));
        assert_eq!(ev("select(true, 1, 2)"), int(1));
        assert_eq!(ev("select(false, 1, 2.5)"), float(2.5));
        assert_eq!(ev("min(max(1, 2), 3) + pow2_ceil(log2(1000))"), int(2 + 16));
    }

    #[test]
    fn function_errors() {
        assert!(err("div_ceil(5, 0)").contains("division by zero in div_ceil(5, 0)"));
        assert!(err("div_ceil(-5, 2)").contains("function `div_ceil`: the first argument must be non-negative"));
        assert!(err("div_ceil(5, -2)").contains("function `div_ceil`: the divisor must be positive"));
        assert!(
            err("div_ceil(5.0, 2)").contains("function `div_ceil`: expected int arguments, found float 5.0, int 2")
        );
        assert!(err("align_up(5, 0)").contains("function `align_up`: the alignment must be positive"));
        assert!(err("align_up(-1, 4)").contains("function `align_up`: the first argument must be non-negative"));
        assert!(
            err("align_up(9223372036854775807, 16)").contains("integer overflow in align_up(9223372036854775807, 16)")
        );
        assert!(err("log2(0)").contains("function `log2`: the argument must be at least 1, found log2(0)"));
        assert!(err("log2(-4)").contains("function `log2`"));
        assert!(err("log2(4.0)").contains("function `log2`: expected an int argument, found float 4.0"));
        assert!(err("pow2_ceil(0)").contains("function `pow2_ceil`: the argument must be at least 1"));
        assert!(err("pow2_ceil(4611686018427387905)").contains("integer overflow in pow2_ceil(4611686018427387905)"));
        assert!(err("float(true)").contains("function `float`: expected an int or float argument, found bool true"));
        assert!(err("int(inf)").contains("function `int`: int(inf) is not finite or outside the i64 range"));
        assert!(err("int(9223372036854775808.0)").contains("function `int`"));
        assert!(err("int(1e19)").contains("function `int`"));
        assert!(err("int(false)").contains("function `int`"));
        assert!(err("f32_bits(true)").contains("function `f32_bits`"));
        assert!(err("f16_bits(true)").contains("function `f16_bits`"));
        assert!(
            err("min(true, 1)").contains("function `min`: expected int or float arguments, found bool true, int 1")
        );
        assert!(err("max(1, false)").contains("function `max`"));
        assert!(err("clamp(1, 3, 2)").contains("function `clamp`: the lower bound exceeds the upper bound"));
        assert!(err("clamp(1.0, 3, 2)").contains("function `clamp`: the lower bound exceeds the upper bound"));
        assert!(err("clamp(1, true, 2)").contains("function `clamp`"));
        assert!(err("select(1, 2, 3)").contains("function `select`: the first argument must be a bool, found int 1"));
    }

    #[test]
    fn arity_and_unknown_functions() {
        let e = Expr::parse("min(1)").unwrap_err();
        assert_eq!(e.to_string(), "expression `min(1)`: function `min` takes 2 arguments, found 1 at offset 0");
        assert!(matches!(e, ExprError::Arity { function: "min", expected: 2, found: 1, offset: 0, .. }));
        let e = Expr::parse("1 + log2(1, 2)").unwrap_err().to_string();
        assert!(e.contains("function `log2` takes 1 argument, found 2 at offset 4"), "{e}");
        assert!(Expr::parse("clamp()").unwrap_err().to_string().contains("takes 3 arguments, found 0"));
        let e = Expr::parse("x + foo(1)").unwrap_err().to_string();
        assert!(
            e.starts_with("expression `x + foo(1)`: unknown function `foo` at offset 4 (functions: min, max,"),
            "{e}"
        );
        assert!(Expr::parse("min(1, 2").unwrap_err().to_string().contains("expected `,` or `)` at offset 8"));
        assert!(
            Expr::parse("min(1 2)").unwrap_err().to_string().contains("expected `,` or `)` at offset 6, found `2`")
        );
        assert!(Expr::parse("min(1,)").unwrap_err().to_string().contains("expected a value at offset 6, found `)`"));
    }

    #[test]
    fn unknown_identifiers() {
        let e = env(&[("B", int(1)), ("H", int(2)), ("D", int(3))]);
        let m = err_in("H * Hkv", &e);
        assert_eq!(m, "expression `H * Hkv`: unknown identifier `Hkv` (known: B, D, H)");
        let m = err("x");
        assert_eq!(m, "expression `x`: unknown identifier `x` (no variables are defined)");
        let many: BTreeMap<String, Value> = (0..50).map(|i| (format!("v{i:02}"), int(i))).collect();
        let Err(ExprError::UnknownIdentifier { known, more, .. }) = eval_in("nope", &many) else { panic!() };
        assert_eq!(known.len(), 40);
        assert_eq!(more, 10);
        assert_eq!(known[0], "v00");
        assert_eq!(known[39], "v39");
        assert!(err_in("nope", &many).ends_with("v38, v39, and 10 more)"));
    }

    #[test]
    fn unknown_identifier_lists_names_sorted_from_any_env() {
        struct Unsorted;
        impl Env for Unsorted {
            fn get(&self, _: &str) -> Option<Value> {
                None
            }
            fn names(&self) -> Vec<String> {
                vec!["z".into(), "a".into(), "m".into(), "a".into()]
            }
        }
        let e = Expr::parse("q").unwrap().eval(&Unsorted).unwrap_err();
        assert_eq!(e.to_string(), "expression `q`: unknown identifier `q` (known: a, m, z)");
        let mut h = HashMap::new();
        h.insert("k".to_string(), int(4));
        assert_eq!(Expr::parse("k * 2").unwrap().eval(&h).unwrap(), int(8));
    }

    #[test]
    fn parse_errors() {
        let e = Expr::parse("KV / ").unwrap_err();
        assert_eq!(e.to_string(), "expression `KV / `: expected a value at offset 5, found end of input");
        assert_eq!(
            Expr::parse("").unwrap_err().to_string(),
            "expression ``: expected a value at offset 0, found end of input"
        );
        assert!(
            Expr::parse("(1 + 2").unwrap_err().to_string().contains("expected `)` at offset 6, found end of input")
        );
        assert!(
            Expr::parse("1 + 2)")
                .unwrap_err()
                .to_string()
                .contains("expected an operator or end of input at offset 5, found `)`")
        );
        assert!(Expr::parse("1 2").unwrap_err().to_string().contains("at offset 2, found `2`"));
        assert!(Expr::parse("a ** b").unwrap_err().to_string().contains("expected a value at offset 3, found `*`"));
        assert!(Expr::parse("()").unwrap_err().to_string().contains("expected a value at offset 1, found `)`"));
        assert!(Expr::parse("? 1 : 2").unwrap_err().to_string().contains("expected a value at offset 0, found `?`"));
        assert!(matches!(Expr::parse("1 +"), Err(ExprError::Parse { offset: 3, .. })));
    }

    #[test]
    fn depth_limits() {
        let ok = format!("{}1{}", "(".repeat(MAX_NESTING - 1), ")".repeat(MAX_NESTING - 1));
        assert_eq!(ev(&ok), int(1));
        let deep = format!("{}1{}", "(".repeat(MAX_NESTING), ")".repeat(MAX_NESTING));
        let e = Expr::parse(&deep).unwrap_err();
        assert!(matches!(e, ExprError::TooDeep { limit: MAX_NESTING, .. }), "{e}");
        assert!(e.to_string().contains("nested too deeply at offset"), "{e}");
        let e = Expr::parse(&"(".repeat(4000)).unwrap_err();
        assert!(matches!(e, ExprError::TooDeep { .. }), "{e}");
        assert!(matches!(Expr::parse(&"-".repeat(4000)).unwrap_err(), ExprError::TooDeep { .. }));
        assert!(matches!(Expr::parse(&"!".repeat(4000)).unwrap_err(), ExprError::TooDeep { .. }));
        let calls = format!("{}1{}", "min(1, ".repeat(100), ")".repeat(100));
        assert!(matches!(Expr::parse(&calls).unwrap_err(), ExprError::TooDeep { .. }));
        let ternaries = "true ? 1 : ".repeat(100) + "0";
        assert!(matches!(Expr::parse(&ternaries).unwrap_err(), ExprError::TooDeep { .. }));
        // Long flat chains are limited by the tree height.
        let chain = vec!["1"; MAX_TREE_HEIGHT].join("+");
        assert_eq!(ev(&chain), int(MAX_TREE_HEIGHT as i64));
        let chain = vec!["1"; 2000].join("+");
        let e = Expr::parse(&chain).unwrap_err();
        assert!(matches!(e, ExprError::TooDeep { limit: MAX_TREE_HEIGHT, .. }), "{e}");
    }

    #[test]
    fn length_limit() {
        let long = format!("1{}", " ".repeat(MAX_SOURCE_CHARS - 1));
        assert_eq!(ev(&long), int(1));
        let too_long = format!("1{}", " ".repeat(MAX_SOURCE_CHARS));
        let e = Expr::parse(&too_long).unwrap_err();
        assert!(matches!(e, ExprError::TooLong { length: 4097, .. }));
        assert!(e.to_string().contains("too long (4097 characters; the limit is 4096)"), "{e}");
        assert!(e.to_string().starts_with("expression `1    "), "{e}");
        assert!(e.to_string().len() < 200);
    }

    #[test]
    fn conversions() {
        let e = env(&[("x", int(3)), ("big", int(1 << 40))]);
        let p = |s: &str| Expr::parse(s).unwrap();
        assert_eq!(p("x + 1").eval_u32(&e).unwrap(), 4);
        assert_eq!(p("4294967295").eval_u32(&e).unwrap(), u32::MAX);
        assert_eq!(p("x > 1").eval_u32(&e).unwrap(), 1);
        assert_eq!(p("x < 1").eval_u32(&e).unwrap(), 0);
        let m = p("x - 6").eval_u32(&e).unwrap_err().to_string();
        assert_eq!(m, "expression `x - 6`: evaluated to -3, expected a u32");
        assert!(p("4294967296").eval_u32(&e).is_err());
        assert!(p("1.0").eval_u32(&e).unwrap_err().to_string().contains("evaluated to 1.0, expected a u32"));
        assert_eq!(p("-x").eval_i32(&e).unwrap(), -3);
        assert_eq!(p("true").eval_i32(&e).unwrap(), 1);
        assert!(p("big").eval_i32(&e).unwrap_err().to_string().contains("expected an i32"));
        assert_eq!(p("big").eval_u64(&e).unwrap(), 1 << 40);
        assert!(p("-1").eval_u64(&e).unwrap_err().to_string().contains("evaluated to -1, expected a u64"));
        assert_eq!(p("x / 2.0").eval_f32(&e).unwrap(), 1.5);
        assert_eq!(p("x").eval_f32(&e).unwrap(), 3.0);
        assert_eq!(p("0.1").eval_f32(&e).unwrap(), 0.1f32);
        assert_eq!(p("-inf").eval_f32(&e).unwrap(), f32::NEG_INFINITY);
        assert!(p("1e300").eval_f32(&e).unwrap_err().to_string().contains("beyond the f32 range"));
        assert!(p("true").eval_f32(&e).is_err());
        assert!(p("x > 2").eval_bool(&e).unwrap());
        assert!(p("x").eval_bool(&e).unwrap_err().to_string().contains("evaluated to 3, expected a boolean"));
        // Evaluation errors pass through the conversions.
        assert!(p("x / 0").eval_u32(&e).unwrap_err().to_string().contains("division by zero"));
    }

    #[test]
    fn identifiers_and_source() {
        let e = Expr::parse("min(b, a) + a * c ? true : x").unwrap();
        assert_eq!(e.identifiers(), vec!["a", "b", "c", "x"]);
        assert_eq!(e.source(), "min(b, a) + a * c ? true : x");
        assert_eq!(e.to_string(), e.source());
        assert!(Expr::parse("1 + inf").unwrap().identifiers().is_empty());
        assert_eq!(Expr::parse("min").unwrap().identifiers(), vec!["min"]);
        let parsed: Expr = "a + 1".parse().unwrap();
        assert_eq!(parsed, Expr::parse("a + 1").unwrap());
        assert_ne!(parsed, Expr::parse("a + 2").unwrap());
    }

    #[test]
    fn lets_chain() {
        let lets = Lets::parse(&["Br = 64", "nblocks = div_ceil(KV, Br)", "total = nblocks * H", "flag = total == 32"])
            .unwrap();
        assert_eq!(lets.names().collect::<Vec<_>>(), vec!["Br", "nblocks", "total", "flag"]);
        assert_eq!(lets.len(), 4);
        assert!(!lets.is_empty());
        let mut e = env(&[("KV", int(1000)), ("H", int(2))]);
        lets.eval_into(&mut e).unwrap();
        assert_eq!(e["nblocks"], int(16));
        assert_eq!(e["total"], int(32));
        assert_eq!(e["flag"], Value::Bool(true));
        let (name, expr) = lets.iter().nth(1).unwrap();
        assert_eq!((name, expr.source()), ("nblocks", "div_ceil(KV, Br)"));
        // A definition may shadow a base variable.
        let mut e = env(&[("H", int(2))]);
        Lets::parse(&["H = H * 2".to_string()]).unwrap().eval_into(&mut e).unwrap();
        assert_eq!(e["H"], int(4));
        assert!(Lets::parse::<&str>(&[]).unwrap().is_empty());
    }

    #[test]
    fn lets_errors() {
        let e = Lets::parse(&["a = 1", "a = 2"]).unwrap_err();
        assert_eq!(e.to_string(), "definition `a = 2`: `a` is already defined by an earlier definition");
        let e = Lets::parse(&["just text"]).unwrap_err();
        assert_eq!(e.to_string(), "definition `just text`: expected `name = expression`");
        assert!(Lets::parse(&["a == b"]).unwrap_err().to_string().contains("expected `name = expression`"));
        assert!(Lets::parse(&[" = 3"]).unwrap_err().to_string().contains("expected `name = expression`"));
        assert!(Lets::parse(&["2x = 3"]).unwrap_err().to_string().contains("`2x` is not a valid name"));
        assert!(Lets::parse(&["a b = 3"]).unwrap_err().to_string().contains("`a b` is not a valid name"));
        assert!(Lets::parse(&["x <= 3"]).unwrap_err().to_string().contains("`x <` is not a valid name"));
        assert!(Lets::parse(&["true = 1"]).unwrap_err().to_string().contains("`true` is a reserved word"));
        let e = Lets::parse(&["ok = 1", "n  =  KV / "]).unwrap_err();
        assert_eq!(e.to_string(), "definition `n  =  KV / `: expected a value at offset 11, found end of input");
        let e = Lets::parse(&["n = min(1)"]).unwrap_err();
        assert_eq!(e.to_string(), "definition `n = min(1)`: function `min` takes 2 arguments, found 1 at offset 4");
        let lets = Lets::parse(&["a = 2", "b = a - 3", "c = b / 2", "d = 1"]).unwrap();
        let mut e = BTreeMap::new();
        let m = lets.eval_into(&mut e).unwrap_err().to_string();
        assert_eq!(
            m,
            "definition `c = b / 2`: negative operand in -1 / 2 (integer `/` and `%` need non-negative operands)"
        );
        assert_eq!(e.len(), 2, "the definitions before the failing one were inserted");
        let lets = Lets::parse(&["a = 1", "b = a + zz"]).unwrap();
        let m = lets.eval_into(&mut BTreeMap::new()).unwrap_err().to_string();
        assert_eq!(m, "definition `b = a + zz`: unknown identifier `zz` (known: a)");
        let long = format!("x = {}", "1 + ".repeat(2000));
        let m = Lets::parse(&[long]).unwrap_err().to_string();
        assert!(m.starts_with("definition `x = 1 + 1 + ") && m.contains("...`: too long"), "{m}");
    }

    // ----- f16 -----

    fn f16(x: f64) -> i64 {
        let e = env(&[("x", float(x))]);
        match eval_in("f16_bits(x)", &e).unwrap() {
            Value::Int(i) => i,
            v => panic!("{v}"),
        }
    }

    /// Exact value of a finite half-precision bit pattern.
    fn decode_f16(bits: u16) -> f64 {
        let sign = if bits & 0x8000 != 0 { -1.0 } else { 1.0 };
        let exponent = i32::from((bits >> 10) & 0x1f);
        let mantissa = f64::from(bits & 0x3ff);
        let magnitude = if exponent == 0 {
            mantissa * 2f64.powi(-24)
        } else {
            (1.0 + mantissa / 1024.0) * 2f64.powi(exponent - 15)
        };
        sign * magnitude
    }

    #[test]
    fn f16_edge_cases() {
        assert_eq!(f16(0.0), 0);
        assert_eq!(f16(-0.0), 0x8000);
        assert_eq!(f16(1.0), 0x3c00);
        assert_eq!(f16(-1.5), 0xbe00);
        assert_eq!(f16(0.1), 0x2e66);
        assert_eq!(f16(65504.0), 0x7bff);
        assert_eq!(f16(65519.99), 0x7bff);
        assert_eq!(f16(65520.0), 0x7c00); // the tie between 65504 and 65536 goes to even: infinity
        assert_eq!(f16(-65520.0), 0xfc00);
        assert_eq!(f16(1e10), 0x7c00);
        assert_eq!(f16(f64::INFINITY), 0x7c00);
        assert_eq!(f16(f64::NEG_INFINITY), 0xfc00);
        assert_eq!(f16(f64::NAN), 0x7e00);
        assert_eq!(f16(-f64::NAN), 0x7e00);
        assert_eq!(f16(2f64.powi(-14)), 0x0400); // smallest normal
        assert_eq!(f16(2f64.powi(-24)), 0x0001); // smallest subnormal
        assert_eq!(f16(2f64.powi(-25)), 0x0000); // tie between 0 and 2^-24: even is 0
        assert_eq!(f16(-(2f64.powi(-25))), 0x8000);
        assert_eq!(f16(2f64.powi(-25) * 1.000001), 0x0001); // just above the tie
        assert_eq!(f16(3.0 * 2f64.powi(-25)), 0x0002); // tie between 1 and 2 units: even is 2 = 2^-23
        assert_eq!(f16(5.0 * 2f64.powi(-25)), 0x0002); // tie between 2 and 3 units: 2
        assert_eq!(f16(7.0 * 2f64.powi(-25)), 0x0004); // tie between 3 and 4 units: 4
        assert_eq!(f16(2f64.powi(-26)), 0x0000);
        assert_eq!(f16(f64::MIN_POSITIVE), 0);
        assert_eq!(f16(5e-324), 0);
        assert_eq!(f16(2f64.powi(-14) - 2f64.powi(-25)), 0x0400); // rounds up out of the subnormals
        assert_eq!(f16(1.0 + 2f64.powi(-11)), 0x3c00); // tie: 1.0 is even
        assert_eq!(f16(1.0 + 3.0 * 2f64.powi(-11)), 0x3c02); // tie: up to even
        assert_eq!(f16(1.0 + 2f64.powi(-11) + 2f64.powi(-40)), 0x3c01);
        assert_eq!(f16(2049.0), 0x6800); // 2048 and 2050 are neighbours; tie to even 2048
        assert_eq!(f16(2051.0), 0x6802);
    }

    #[test]
    fn f16_round_trips_and_rounds_every_midpoint() {
        let finite: Vec<u16> = (0..=0x7bffu16).collect();
        for &b in &finite {
            for sign in [0u16, 0x8000] {
                let bits = b | sign;
                assert_eq!(f64_to_f16_bits(decode_f16(bits)), bits, "{bits:#06x}");
            }
            // Midpoint to the next pattern up (0x7bff's neighbour is infinity, value 65536).
            let lo = decode_f16(b);
            let hi = if b == 0x7bff { 65536.0 } else { decode_f16(b + 1) };
            let mid = (lo + hi) / 2.0; // exact in f64
            let even = if b & 1 == 0 { b } else { b + 1 };
            assert_eq!(f64_to_f16_bits(mid), even, "midpoint above {b:#06x}");
            assert_eq!(f64_to_f16_bits(-mid), even | 0x8000, "midpoint above -{b:#06x}");
            let below = f64::from_bits(mid.to_bits() - 1);
            let above = f64::from_bits(mid.to_bits() + 1);
            assert_eq!(f64_to_f16_bits(below), b, "just below the midpoint above {b:#06x}");
            assert_eq!(f64_to_f16_bits(above), b + 1, "just above the midpoint above {b:#06x}");
        }
    }

    // ----- robustness -----

    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            // splitmix64
            self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^ (z >> 31)
        }

        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }
    }

    fn fuzz_env() -> BTreeMap<String, Value> {
        env(&[
            ("a", int(0)),
            ("b", int(-1)),
            ("c", int(i64::MAX)),
            ("d", int(i64::MIN)),
            ("e", float(f64::NAN)),
            ("f", float(f64::INFINITY)),
            ("g", Value::Bool(true)),
            ("h", float(-0.0)),
            ("x", int(3)),
        ])
    }

    fn exercise(src: &str, env: &BTreeMap<String, Value>) {
        match Expr::parse(src) {
            Ok(e) => {
                let _ = e.identifiers();
                for result in [e.eval(env).map(|_| ()), e.eval_u32(env).map(|_| ()), e.eval_f32(env).map(|_| ())] {
                    if let Err(err) = result {
                        assert!(err.to_string().starts_with("expression `"), "{err}");
                    }
                }
                let _ = e.eval_i32(env);
                let _ = e.eval_u64(env);
                let _ = e.eval_bool(env);
            }
            Err(err) => assert!(err.to_string().starts_with("expression `"), "{err}"),
        }
        let _ = Lets::parse(&[format!("v = {src}")]).map(|l| l.eval_into(&mut env.clone()));
    }

    #[test]
    fn random_bytes_never_panic() {
        let env = fuzz_env();
        let mut rng = Rng(1);
        let alphabet: Vec<char> = "0123456789abcdefxABCDEF_ .eE+-*/%<>=!&|^~?:(),#\t\né\u{0}".chars().collect();
        for _ in 0..3000 {
            let len = rng.below(40);
            let s: String = if rng.below(4) == 0 {
                let bytes: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
                String::from_utf8_lossy(&bytes).into_owned()
            } else {
                (0..len).map(|_| alphabet[rng.below(alphabet.len())]).collect()
            };
            exercise(&s, &env);
        }
    }

    #[test]
    fn random_token_soup_never_panics() {
        const TOKENS: &[&str] = &[
            "a",
            "b",
            "c",
            "d",
            "e",
            "f",
            "g",
            "h",
            "x",
            "zz",
            "0",
            "1",
            "2",
            "62",
            "63",
            "64",
            "-1",
            "9223372036854775807",
            "0x7fffffffffffffff",
            "1.5",
            "0.0",
            "1e308",
            "2.",
            ".5",
            "inf",
            "true",
            "false",
            "(",
            "(",
            ")",
            ")",
            "+",
            "-",
            "*",
            "/",
            "%",
            "<<",
            ">>",
            "<",
            "<=",
            ">",
            ">=",
            "==",
            "!=",
            "&",
            "|",
            "^",
            "&&",
            "||",
            "!",
            "~",
            "?",
            ":",
            ",",
            "min(",
            "max(",
            "div_ceil(",
            "align_up(",
            "log2(",
            "pow2_ceil(",
            "float(",
            "int(",
            "f32_bits(",
            "f16_bits(",
            "clamp(",
            "select(",
            "nope(",
        ];
        let env = fuzz_env();
        let mut rng = Rng(2);
        let mut parsed = 0;
        for _ in 0..5000 {
            let n = 1 + rng.below(14);
            let s = (0..n).map(|_| TOKENS[rng.below(TOKENS.len())]).collect::<Vec<_>>().join(" ");
            parsed += usize::from(Expr::parse(&s).is_ok());
            exercise(&s, &env);
        }
        assert!(parsed > 100, "the soup should parse sometimes ({parsed})");
    }

    #[test]
    fn well_formed_random_expressions_never_panic() {
        // Random trees that always parse, so evaluation is exercised on every operator.
        fn random_expr(rng: &mut Rng, depth: usize) -> String {
            const LEAVES: &[&str] =
                &["a", "b", "c", "d", "e", "f", "g", "h", "x", "0", "1", "2", "63", "-1", "1.5", "inf", "true"];
            const OPS: &[&str] =
                &["+", "-", "*", "/", "%", "<<", ">>", "<", "<=", ">", ">=", "==", "!=", "&", "|", "^", "&&", "||"];
            const FUNCS: &[(&str, usize)] = &[
                ("min", 2),
                ("max", 2),
                ("div_ceil", 2),
                ("align_up", 2),
                ("log2", 1),
                ("pow2_ceil", 1),
                ("float", 1),
                ("int", 1),
                ("f32_bits", 1),
                ("f16_bits", 1),
                ("clamp", 3),
                ("select", 3),
            ];
            if depth == 0 || rng.below(4) == 0 {
                return LEAVES[rng.below(LEAVES.len())].to_string();
            }
            match rng.below(4) {
                0 => format!(
                    "({} {} {})",
                    random_expr(rng, depth - 1),
                    OPS[rng.below(OPS.len())],
                    random_expr(rng, depth - 1)
                ),
                1 => format!("{}{}", ["-", "!", "~"][rng.below(3)], random_expr(rng, depth - 1)),
                2 => format!(
                    "({} ? {} : {})",
                    random_expr(rng, depth - 1),
                    random_expr(rng, depth - 1),
                    random_expr(rng, depth - 1)
                ),
                _ => {
                    let (name, arity) = FUNCS[rng.below(FUNCS.len())];
                    let args = (0..arity).map(|_| random_expr(rng, depth - 1)).collect::<Vec<_>>().join(", ");
                    format!("{name}({args})")
                }
            }
        }
        let env = fuzz_env();
        let mut rng = Rng(3);
        let mut ok = 0;
        for _ in 0..5000 {
            let s = random_expr(&mut rng, 5);
            let e = Expr::parse(&s).unwrap_or_else(|e| panic!("{s}: {e}"));
            ok += usize::from(e.eval(&env).is_ok());
            exercise(&s, &env);
        }
        assert!(ok > 100, "{ok}");
    }
}
