//! Helpers shared by the attribute parsers.

use syn::meta::ParseNestedMeta;

/// Collects several errors so the user sees all of them at once.
#[derive(Default)]
pub struct Errors(Option<syn::Error>);

impl Errors {
    pub fn push(&mut self, err: syn::Error) {
        match &mut self.0 {
            Some(all) => all.combine(err),
            None => self.0 = Some(err),
        }
    }

    pub fn spanned<T: quote::ToTokens>(&mut self, node: T, msg: impl std::fmt::Display) {
        self.push(syn::Error::new_spanned(node, msg));
    }

    pub fn finish(self) -> syn::Result<()> {
        match self.0 {
            Some(err) => Err(err),
            None => Ok(()),
        }
    }
}

/// An attribute value that may be given once.
pub struct Once<T> {
    name: &'static str,
    value: Option<T>,
}

impl<T> Once<T> {
    pub fn new(name: &'static str) -> Self {
        Once { name, value: None }
    }

    pub fn set(&mut self, meta: &ParseNestedMeta, value: T) -> syn::Result<()> {
        if self.value.is_some() {
            return Err(meta.error(format!("duplicate `{}` attribute; give it once", self.name)));
        }
        self.value = Some(value);
        Ok(())
    }

    pub fn get(self) -> Option<T> {
        self.value
    }
}

/// snake_case of a CamelCase identifier: `BookBorrowed` -> `book_borrowed`.
pub fn snake_case(name: &str) -> String {
    let mut out = String::with_capacity(name.len() + 4);
    let chars: Vec<char> = name.chars().collect();
    for (i, &c) in chars.iter().enumerate() {
        if c.is_uppercase() {
            let prev_lower =
                i > 0 && (chars[i - 1].is_lowercase() || chars[i - 1].is_ascii_digit());
            let next_lower = chars.get(i + 1).is_some_and(|n| n.is_lowercase());
            if i > 0 && (prev_lower || (next_lower && chars[i - 1].is_uppercase())) {
                out.push('_');
            }
            out.extend(c.to_lowercase());
        } else {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::snake_case;

    #[test]
    fn snake() {
        assert_eq!(snake_case("BookBorrowed"), "book_borrowed");
        assert_eq!(snake_case("HTTPRequestMade"), "http_request_made");
        assert_eq!(snake_case("V2Thing"), "v2_thing");
        assert_eq!(snake_case("a"), "a");
    }
}
