//! The plain-text table `outpost ctl` prints: left-aligned columns, two spaces apart.

/// Left-aligned columns two spaces apart; the last column is not padded.
pub(super) struct Table {
    headers: Vec<String>,
    rows: Vec<Vec<String>>,
}

impl Table {
    pub(super) fn new(headers: &[&str]) -> Table {
        Table { headers: headers.iter().map(|h| h.to_string()).collect(), rows: Vec::new() }
    }

    pub(super) fn row(&mut self, cells: Vec<String>) {
        debug_assert_eq!(cells.len(), self.headers.len(), "a row has one cell per column");
        self.rows.push(cells);
    }

    pub(super) fn render(&self) -> String {
        self.render_rows(std::iter::once(&self.headers).chain(&self.rows))
    }

    pub(super) fn render_without_header(&self) -> String {
        self.render_rows(self.rows.iter())
    }

    fn render_rows<'a>(&'a self, rows: impl Iterator<Item = &'a Vec<String>> + Clone) -> String {
        let mut widths = vec![0; self.headers.len()];
        for row in rows.clone() {
            for (width, cell) in widths.iter_mut().zip(row) {
                *width = (*width).max(cell.chars().count());
            }
        }
        let mut out = String::new();
        for row in rows {
            let mut line = String::new();
            for (i, (cell, width)) in row.iter().zip(&widths).enumerate() {
                if i + 1 == row.len() {
                    line.push_str(cell);
                } else {
                    line.push_str(cell);
                    line.extend(std::iter::repeat_n(' ', width - cell.chars().count() + 2));
                }
            }
            out.push_str(line.trim_end());
            out.push('\n');
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_align_columns_and_do_not_pad_the_last() {
        let mut table = Table::new(&["EDGE", "STATE", "DETAIL"]);
        table.row(vec!["store-042".into(), "online".into(), "x".into()]);
        table.row(vec!["b".into(), "transition_to_online".into(), "".into()]);
        assert_eq!(
            table.render(),
            "EDGE       STATE                 DETAIL\n\
             store-042  online                x\n\
             b          transition_to_online\n"
        );
    }
}
