//! Plain-text tables and the number formats every report shares.

/// Column alignment.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Align {
    Left,
    Right,
}

/// A table of strings, rendered with columns padded to their widest cell.
pub struct Table {
    headers: Vec<&'static str>,
    align: Vec<Align>,
    rows: Vec<Vec<String>>,
}

impl Table {
    pub fn new(columns: &[(&'static str, Align)]) -> Table {
        Table {
            headers: columns.iter().map(|c| c.0).collect(),
            align: columns.iter().map(|c| c.1).collect(),
            rows: Vec::new(),
        }
    }

    /// Adds a row; missing cells are empty, extra cells are dropped.
    pub fn row(&mut self, mut cells: Vec<String>) {
        cells.resize(self.headers.len(), String::new());
        self.rows.push(cells);
    }

    /// The table, one line per row (header first), each ending in a newline.
    pub fn render(&self) -> String {
        let width = |i: usize| {
            self.rows.iter().map(|r| r[i].chars().count()).chain([self.headers[i].chars().count()]).max().unwrap_or(0)
        };
        let widths: Vec<usize> = (0..self.headers.len()).map(width).collect();
        let line = |cells: &[String]| {
            let mut out = String::new();
            for (i, cell) in cells.iter().enumerate() {
                if i > 0 {
                    out.push_str("  ");
                }
                let pad = widths[i] - cell.chars().count();
                match self.align[i] {
                    Align::Left => {
                        out.push_str(cell);
                        out.extend(std::iter::repeat_n(' ', pad));
                    }
                    Align::Right => {
                        out.extend(std::iter::repeat_n(' ', pad));
                        out.push_str(cell);
                    }
                }
            }
            let mut out = out.trim_end().to_string();
            out.push('\n');
            out
        };
        let headers: Vec<String> = self.headers.iter().map(|h| h.to_string()).collect();
        let mut out = line(&headers);
        for row in &self.rows {
            out.push_str(&line(row));
        }
        out
    }
}

/// A measured number: `-` for NaN (not measured), `inf`, `0`, 4 significant digits in the
/// readable range, scientific notation outside it.
pub fn num(x: f64) -> String {
    if x.is_nan() {
        "-".to_string()
    } else if x.is_infinite() {
        if x > 0.0 { "inf".to_string() } else { "-inf".to_string() }
    } else if x == 0.0 {
        "0".to_string()
    } else if (1e-3..1e4).contains(&x.abs()) {
        let digits = (3 - x.abs().log10().floor() as i32).clamp(0, 6) as usize;
        format!("{x:.digits$}")
    } else {
        format!("{x:.2e}")
    }
}

/// A byte count in binary units (`64 KiB`, `4.0 GiB`).
pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = n as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if value.fract() == 0.0 { format!("{value} {}", UNITS[unit]) } else { format!("{value:.1} {}", UNITS[unit]) }
}

pub fn yes_no(b: bool) -> String {
    if b { "yes" } else { "no" }.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_read_well() {
        assert_eq!(num(f64::NAN), "-");
        assert_eq!(num(f64::INFINITY), "inf");
        assert_eq!(num(0.0), "0");
        assert_eq!(num(0.01234), "0.01234");
        assert_eq!(num(12.5), "12.50");
        assert_eq!(num(1.5e-7), "1.50e-7");
        assert_eq!(bytes(65536), "64 KiB");
        assert_eq!(bytes(4294967295), "4.0 GiB");
    }

    #[test]
    fn columns_are_padded_to_the_widest_cell() {
        let mut t = Table::new(&[("name", Align::Left), ("ms", Align::Right)]);
        t.row(vec!["a".into(), "10.0".into()]);
        t.row(vec!["long-name".into(), "1.0".into()]);
        assert_eq!(t.render(), "name         ms\na          10.0\nlong-name   1.0\n");
    }
}
