//! Text helpers shared by the table printers.

/// Escapes control characters (a newline in a file name, for one) and backslashes as
/// `\xHH`, as util-linux tables do, so that one row stays on one line and an escape cannot
/// be mistaken for a name. Other characters stay as they are.
pub fn escape_control(cell: &str) -> String {
    let mut escaped = String::with_capacity(cell.len());
    for character in cell.chars() {
        if character.is_control() || character == '\\' {
            let mut bytes = [0u8; 4];
            for byte in character.encode_utf8(&mut bytes).bytes() {
                escaped.push_str(&format!("\\x{byte:02x}"));
            }
        } else {
            escaped.push(character);
        }
    }
    escaped
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escape_control_keeps_printable_text() {
        assert_eq!(
            escape_control("/tmp/new\nline.img"),
            "/tmp/new\\x0aline.img"
        );
        assert_eq!(escape_control("/tmp/a b/é.img"), "/tmp/a b/é.img");
        assert_eq!(escape_control("tab\there"), "tab\\x09here");
        assert_eq!(escape_control("back\\x0a.img"), "back\\x5cx0a.img");
    }
}
