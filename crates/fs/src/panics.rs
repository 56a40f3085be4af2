//! What a caught panic said: the servers catch a panic while serving one
//! request or image and turn it into that request's error, naming it.

use std::any::Any;

/// The message a panic carried (`panic!` with a literal or a format).
pub fn panic_message(payload: &(dyn Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&'static str>() {
        s.to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "a panic without a message".to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_of_literal_and_formatted_panics() {
        let caught = |f: fn()| std::panic::catch_unwind(f).unwrap_err();
        assert_eq!(panic_message(&*caught(|| panic!("literal"))), "literal");
        assert_eq!(panic_message(&*caught(|| panic!("n = {}", 7))), "n = 7");
        assert_eq!(
            panic_message(&*caught(|| std::panic::panic_any(7u8))),
            "a panic without a message"
        );
    }
}
