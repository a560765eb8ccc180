//! `#[derive(Event)]`: attributes -> checked model -> tokens.

use crate::attr::{snake_case, Errors, Once};
use proc_macro2::TokenStream;
use quote::{format_ident, quote};
use syn::{Data, DeriveInput, Fields, LitInt, LitStr};

const ENVELOPE_COLUMNS: [&str; 4] = [
    "global_position",
    "stream_id",
    "stream_version",
    "created_at",
];

pub fn derive(input: DeriveInput) -> TokenStream {
    match derive_inner(&input) {
        Ok(tokens) => tokens,
        Err(err) => {
            let mut out = err.to_compile_error();
            out.extend(fallback(&input));
            out
        }
    }
}

/// Keeps follow-up errors away: the type still implements the trait.
fn fallback(input: &DeriveInput) -> TokenStream {
    if !input.generics.params.is_empty() {
        return TokenStream::new();
    }
    let ident = &input.ident;
    let krate = default_crate();
    quote! {
        const _: () = {
            #[automatically_derived]
            impl #krate::Event for #ident {
                const EVENT_TYPES: &'static [&'static str] = &[];
                fn event_type(&self) -> &'static str { unreachable!() }
                fn event_version(&self) -> u16 { unreachable!() }
                fn encode(&self) -> ::core::result::Result<::std::string::String, #krate::EncodeError> { unreachable!() }
                fn decode(_: &str, _: u16, _: &str) -> ::core::result::Result<Self, #krate::DecodeError> { unreachable!() }
            }
        };
    }
}

fn default_crate() -> syn::Path {
    syn::parse_quote!(::es_diesel::__private::es_core)
}

pub fn derive_inner(input: &DeriveInput) -> syn::Result<TokenStream> {
    match &input.data {
        Data::Struct(data) => {
            let model = StructModel::parse(input, &data.fields)?;
            Ok(model.expand())
        }
        Data::Enum(data) => {
            let model = EnumModel::parse(input, data)?;
            Ok(model.expand())
        }
        Data::Union(u) => Err(syn::Error::new_spanned(
            u.union_token,
            "an event must be a struct with named fields, or an enum whose variants each wrap one event struct; unions cannot be stored",
        )),
    }
}

struct ContainerAttrs {
    /// `tag = "fmt"` or `tag = field`, in order.
    tags: Vec<TagAttr>,
    /// `tags = path::to::fn`.
    tags_fn: Option<syn::Path>,
    name: Option<(String, LitStr)>,
    copy: Option<syn::Path>,
    version: Option<u16>,
    view: Option<ViewSetting>,
    krate: Option<syn::Path>,
}

enum ViewSetting {
    Off,
    Named(syn::Ident),
}

fn parse_container_attrs(input: &DeriveInput, errors: &mut Errors) -> ContainerAttrs {
    let mut name = Once::new("name");
    let mut version = Once::new("version");
    let mut view = Once::new("view");
    let mut krate = Once::new("crate");
    let mut copy = Once::new("copy");
    let mut tags = Vec::new();
    let mut tags_fn = Once::new("tags");
    for attr in input.attrs.iter().filter(|a| a.path().is_ident("event")) {
        let res = attr.parse_nested_meta(|meta| {
            if meta.path.is_ident("name") {
                let lit: LitStr = meta.value()?.parse()?;
                if lit.value().trim().is_empty() {
                    return Err(syn::Error::new_spanned(&lit, "the event type name cannot be empty; write e.g. #[event(name = \"BookBorrowed\")]"));
                }
                name.set(&meta, (lit.value(), lit))
            } else if meta.path.is_ident("version") {
                let value = meta.value()?;
                let lit: syn::Lit = value.parse()?;
                let v = match &lit {
                    syn::Lit::Int(int) => parse_version(int)?,
                    other => {
                        return Err(syn::Error::new_spanned(
                            other,
                            "`version` takes a positive integer literal without quotes, e.g. #[event(version = 2)]",
                        ))
                    }
                };
                version.set(&meta, v)
            } else if meta.path.is_ident("view") {
                let lit: syn::Lit = meta.value()?.parse()?;
                let setting = match &lit {
                    syn::Lit::Bool(b) if !b.value => ViewSetting::Off,
                    syn::Lit::Str(s) => match syn::parse_str::<syn::Ident>(&s.value()) {
                        Ok(ident) => ViewSetting::Named(syn::Ident::new(&ident.to_string(), s.span())),
                        Err(_) => return Err(syn::Error::new_spanned(s, "the view name must be a valid identifier, e.g. #[event(view = \"book_borrowed\")]")),
                    },
                    other => {
                        return Err(syn::Error::new_spanned(
                            other,
                            "`view` takes a name, e.g. #[event(view = \"book_borrowed\")], or `false` to generate no typed view",
                        ))
                    }
                };
                view.set(&meta, setting)
            } else if meta.path.is_ident("copy") {
                copy.set(&meta, meta.path.clone())
            } else if meta.path.is_ident("tag") {
                let value = meta.value()?;
                if value.peek(LitStr) {
                    tags.push(TagAttr::Format(value.parse()?));
                } else if value.peek(syn::Ident) {
                    tags.push(TagAttr::Field(value.parse()?));
                } else {
                    return Err(value.error("`tag` takes a field, e.g. #[event(tag = book_id)] (the tag `book_id:42`), or a format of fields, e.g. #[event(tag = \"book:{book_id}\")]"));
                }
                Ok(())
            } else if meta.path.is_ident("tags") {
                let value = meta.value()?;
                let path: syn::Path = value.parse().map_err(|e| syn::Error::new(e.span(), "`tags` takes the path of a function `fn(&Self) -> Vec<String>`, e.g. #[event(tags = Self::tags_of)]"))?;
                tags_fn.set(&meta, path)
            } else if meta.path.is_ident("crate") {
                let value = meta.value()?;
                let path: syn::Path = if value.peek(LitStr) {
                    value.parse::<LitStr>()?.parse()?
                } else {
                    value.parse()?
                };
                krate.set(&meta, path)
            } else {
                Err(meta.error(format!(
                    "unknown event attribute `{}`; expected one of: name = \"..\", version = N, view = \"..\" | false, tag = field | \"key:{{field}}\", tags = path, copy, crate = path",
                    path_text(&meta.path)
                )))
            }
        });
        if let Err(err) = res {
            errors.push(err);
        }
    }
    ContainerAttrs {
        tags,
        tags_fn: tags_fn.get(),
        name: name.get(),
        copy: copy.get(),
        version: version.get(),
        view: view.get(),
        krate: krate.get(),
    }
}

fn parse_version(int: &LitInt) -> syn::Result<u16> {
    match int.base10_parse::<u16>() {
        Ok(0) => Err(syn::Error::new_spanned(
            int,
            "event versions start at 1; write #[event(version = 1)] or more",
        )),
        Ok(v) if v <= i16::MAX as u16 => Ok(v),
        _ => Err(syn::Error::new_spanned(
            int,
            "`version` must be in 1..=32767 (it is stored as a SMALLINT), e.g. #[event(version = 2)]",
        )),
    }
}

fn path_text(path: &syn::Path) -> String {
    quote!(#path).to_string().replace(' ', "")
}

enum TagAttr {
    Format(LitStr),
    Field(syn::Ident),
}

/// One declared tag: text and fields, e.g. `course:` then `course_id`.
struct TagPlan {
    pieces: Vec<Piece>,
}

enum Piece {
    Text(String),
    /// A field, and whether it is an `Option` (no tag when `None`).
    Field(syn::Ident, bool),
}

/// Parses `tag = ..` against the struct's fields: (tags, the declaration
/// as text for `migrate` to compare).
fn plan_tags(
    attrs: &[TagAttr],
    tags_fn: Option<&syn::Path>,
    fields: &[(syn::Ident, bool)],
    errors: &mut Errors,
) -> (Vec<TagPlan>, String) {
    let names = || {
        fields
            .iter()
            .map(|(f, _)| format!("`{f}`"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    // Fields by their name as written in tags: `r#type` is `type`.
    let plain = |f: &syn::Ident| f.to_string().trim_start_matches("r#").to_owned();
    let find = |name: &str| fields.iter().find(|(f, _)| plain(f) == name);
    let mut plans = Vec::new();
    let mut spec = Vec::new();
    for attr in attrs {
        match attr {
            TagAttr::Field(ident) => match find(&plain(ident)) {
                Some((f, opt)) => {
                    let key = plain(f);
                    spec.push(format!("{key}:{{{key}}}"));
                    plans.push(TagPlan {
                        pieces: vec![
                            Piece::Text(format!("{key}:")),
                            Piece::Field(f.clone(), *opt),
                        ],
                    });
                }
                None => errors.spanned(
                    ident,
                    format!(
                        "no field `{ident}` to tag the event with; the fields are {}",
                        names()
                    ),
                ),
            },
            TagAttr::Format(lit) => {
                let text = lit.value();
                let mut pieces = Vec::new();
                let mut literal = String::new();
                let mut chars = text.chars().peekable();
                let mut ok = true;
                while let Some(c) = chars.next() {
                    match c {
                        '{' if chars.peek() == Some(&'{') => {
                            chars.next();
                            literal.push('{');
                        }
                        '}' if chars.peek() == Some(&'}') => {
                            chars.next();
                            literal.push('}');
                        }
                        '{' => {
                            let mut name = String::new();
                            let mut closed = false;
                            for c in chars.by_ref() {
                                if c == '}' {
                                    closed = true;
                                    break;
                                }
                                name.push(c);
                            }
                            if !closed {
                                ok = false;
                                errors.spanned(lit, format!("`{{{name}` is not closed; write `{{{name}}}` for a field, or `{{{{` for the character"));
                                break;
                            }
                            match find(name.trim()) {
                                Some((f, opt)) => {
                                    if !literal.is_empty() {
                                        pieces.push(Piece::Text(std::mem::take(&mut literal)));
                                    }
                                    pieces.push(Piece::Field(f.clone(), *opt));
                                }
                                None => {
                                    ok = false;
                                    errors.spanned(lit, format!(
                                        "`{{{name}}}` in the tag names no field of this event; the fields are {}; write e.g. #[event(tag = \"course:{{course_id}}\")]",
                                        names()
                                    ));
                                }
                            }
                        }
                        '}' => {
                            ok = false;
                            errors.spanned(lit, "a lone `}` in the tag; write `}}` for the character, or `{field}` for a field");
                        }
                        c => literal.push(c),
                    }
                }
                if !literal.is_empty() {
                    pieces.push(Piece::Text(literal));
                }
                if ok && !pieces.iter().any(|p| matches!(p, Piece::Field(..))) {
                    errors.spanned(lit, "this tag names no field, so every event would carry it; name a field, e.g. #[event(tag = \"course:{course_id}\")]");
                    ok = false;
                }
                if ok {
                    spec.push(text);
                    plans.push(TagPlan { pieces });
                }
            }
        }
    }
    if let Some(path) = tags_fn {
        spec.push(format!("fn {}", path_text(path)));
    }
    (plans, spec.join(" | "))
}

struct StructModel<'a> {
    ident: &'a syn::Ident,
    tags: Vec<TagPlan>,
    tags_fn: Option<syn::Path>,
    tag_spec: String,
    name: String,
    version: u16,
    krate: syn::Path,
    copy: bool,
    view: Option<View>,
    /// Float fields written as JSON numbers: (field, JSON key, is an Option).
    floats: Vec<(syn::Ident, String, bool)>,
}

struct View {
    ident: syn::Ident,
    columns: Vec<Column>,
}

struct Column {
    ident: syn::Ident,
    json_key: String,
    kind: &'static str,
    nullable: bool,
}

impl<'a> StructModel<'a> {
    fn parse(input: &'a DeriveInput, fields: &'a Fields) -> syn::Result<Self> {
        let mut errors = Errors::default();
        let attrs = parse_container_attrs(input, &mut errors);
        if !input.generics.params.is_empty() {
            errors.spanned(
                &input.generics,
                "an event cannot be generic: its stored type name must name one concrete shape",
            );
        }
        let named = match fields {
            Fields::Named(named) => Some(named),
            Fields::Unnamed(u) => {
                errors.spanned(u, "an event needs named fields so its JSON payload and view columns have names; write `struct Name { field: Type }`");
                None
            }
            Fields::Unit => {
                errors.spanned(
                    &input.ident,
                    "an event needs at least one named field; write `struct Name { field: Type }`",
                );
                None
            }
        };
        let name = attrs
            .name
            .map(|(n, _)| n)
            .unwrap_or_else(|| input.ident.to_string());
        let view_enabled = !matches!(attrs.view, Some(ViewSetting::Off));
        let view_ident = match attrs.view {
            Some(ViewSetting::Named(ident)) => ident,
            _ => format_ident!(
                "{}",
                snake_case(&input.ident.to_string()),
                span = input.ident.span()
            ),
        };
        let field_kinds: Vec<(syn::Ident, bool)> = named
            .into_iter()
            .flat_map(|n| n.named.iter())
            .map(|f| (f.ident.clone().expect("named field"), is_option(&f.ty)))
            .collect();
        let (tags, tag_spec) = plan_tags(
            &attrs.tags,
            attrs.tags_fn.as_ref(),
            &field_kinds,
            &mut errors,
        );
        let mut columns = Vec::new();
        let mut floats = Vec::new();
        if view_enabled {
            if let Some(rename_all) = serde_container_rename_all(input) {
                errors.spanned(rename_all, "the typed view cannot follow #[serde(rename_all)]; rename fields one by one with #[serde(rename = \"..\")], or turn the view off with #[event(view = false)]");
            }
        }
        for field in named.into_iter().flat_map(|n| n.named.iter()) {
            let ident = field.ident.clone().expect("named field");
            let json = match parse_field_attrs(field) {
                Ok(json) => json,
                Err(err) => {
                    errors.push(err);
                    continue;
                }
            };
            let serde = serde_items(field);
            let serde_flag = |flag: &str| serde.iter().any(|(k, _)| k == flag);
            let custom = [
                "skip",
                "skip_serializing",
                "serialize_with",
                "with",
                "flatten",
            ]
            .into_iter()
            .any(serde_flag);
            let json_key = serde_rename(field)
                .unwrap_or_else(|| ident.to_string().trim_start_matches("r#").to_owned());
            if !custom {
                if let Some(is_option) = float_field(&field.ty) {
                    floats.push((ident.clone(), json_key.clone(), is_option));
                }
            }
            if !view_enabled {
                continue;
            }
            if has_serde_flag(field, "flatten") {
                errors.spanned(field, "a #[serde(flatten)] field has no single column in the typed view; turn the view off with #[event(view = false)]");
                continue;
            }
            if has_serde_flag(field, "skip") || has_serde_flag(field, "skip_serializing") {
                continue;
            }
            let column_name = ident.to_string();
            let column_name = column_name.trim_start_matches("r#");
            if ENVELOPE_COLUMNS.contains(&column_name) {
                errors.spanned(&ident, format!("field `{column_name}` collides with the view's envelope column of the same name; rename the field, or turn the view off with #[event(view = false)]"));
                continue;
            }
            let (kind, nullable) = if json {
                ("Json", is_option(&field.ty))
            } else {
                let ty = &field.ty;
                let ty_text = quote!(#ty).to_string().replace(' ', "");
                match column_kind(&field.ty) {
                    Ok(k) => k,
                    Err(Unmapped::TooWide(int)) => {
                        let instead = if int.ends_with("128") {
                            "no SQL integer column holds 128-bit values; store the number as a `String`"
                        } else {
                            "its values above i64::MAX do not fit the view's BIGINT column and would break every query on the view; use `i64` (or `u32`)"
                        };
                        errors.spanned(ty, format!(
                            "field `{column_name}` of type `{ty_text}` cannot be a column of the typed view `{view_ident}`: {instead}, mark the field #[event(json)] to expose it as JSON text, or turn the view off with #[event(view = false)]"
                        ));
                        continue;
                    }
                    Err(Unmapped::Other) => {
                        errors.spanned(ty, format!(
                            "field `{column_name}` of type `{ty_text}` has no column type in the typed view `{view_ident}`; mark the field #[event(json)] to expose it as JSON text, or turn the view off with #[event(view = false)]"
                        ));
                        continue;
                    }
                }
            };
            columns.push(Column {
                ident,
                json_key,
                kind,
                nullable,
            });
        }
        errors.finish()?;
        Ok(StructModel {
            ident: &input.ident,
            tags,
            tags_fn: attrs.tags_fn,
            tag_spec,
            name,
            version: attrs.version.unwrap_or(1),
            krate: attrs.krate.unwrap_or_else(default_crate),
            copy: attrs.copy.is_some(),
            view: view_enabled.then_some(View {
                ident: view_ident,
                columns,
            }),
            floats,
        })
    }

    fn expand(&self) -> TokenStream {
        let StructModel {
            ident,
            name,
            version,
            krate,
            copy,
            ..
        } = self;
        let finite_checks = self.floats.iter().map(|(field, key, is_option)| {
            let path = format!("$.{key}");
            let value = if *is_option {
                quote!(self.#field)
            } else {
                quote!(::core::option::Option::Some(self.#field))
            };
            quote! {
                if let ::core::option::Option::Some(value) = #value {
                    if !value.is_finite() {
                        return ::core::result::Result::Err(#krate::EncodeError::NonFinite {
                            event_type: #name,
                            path: #path,
                            value: value as f64,
                        });
                    }
                }
            }
        });
        let tagged = !self.tags.is_empty() || self.tags_fn.is_some();
        let tag_spec = &self.tag_spec;
        let tags_of = if tagged {
            quote! {
                ::core::option::Option::Some({
                    fn tags_of(
                        event_version: u16,
                        payload: &str,
                    ) -> ::core::result::Result<::std::vec::Vec<::std::string::String>, #krate::DecodeError> {
                        let event = <#ident as #krate::Event>::decode(#name, event_version, payload)?;
                        ::core::result::Result::Ok(<#ident as #krate::Event>::tags(&event))
                    }
                    tags_of as #krate::__private::TagsOf
                })
            }
        } else {
            quote!(::core::option::Option::None)
        };
        let tag_pushes = self.tags.iter().map(|plan| {
            let mut fmt = String::new();
            let mut args = Vec::new();
            let mut options = Vec::new();
            for (i, piece) in plan.pieces.iter().enumerate() {
                match piece {
                    Piece::Text(t) => fmt.push_str(&t.replace('{', "{{").replace('}', "}}")),
                    Piece::Field(f, opt) => {
                        fmt.push_str("{}");
                        if *opt {
                            let v = format_ident!("__tag_value_{}", i);
                            options.push((v.clone(), f.clone()));
                            args.push(quote!(#v));
                        } else {
                            args.push(quote!(self.#f));
                        }
                    }
                }
            }
            let push = quote! { tags.push(::std::format!(#fmt, #(#args),*)); };
            options.iter().rev().fold(push, |inner, (v, f)| {
                quote! {
                    if let ::core::option::Option::Some(#v) = &self.#f {
                        #inner
                    }
                }
            })
        });
        let tags_fn_call = self.tags_fn.as_ref().map(|path| {
            quote! { tags.extend(#path(self)); }
        });
        let tags_method = tagged.then(|| {
            quote! {
                fn tags(&self) -> ::std::vec::Vec<::std::string::String> {
                    let mut tags = ::std::vec::Vec::new();
                    #(#tag_pushes)*
                    #tags_fn_call
                    tags
                }
            }
        });
        let mut out = quote! {
            #krate::__private::inventory::submit! {
                #krate::__private::EventRegistration {
                    name: #name,
                    version: #version,
                    rust_type: ::core::concat!(::core::module_path!(), "::", ::core::stringify!(#ident)),
                    copy: #copy,
                    tags: #tags_of,
                    tag_spec: #tag_spec,
                }
            }

            const _: () = {
                #[automatically_derived]
                impl #krate::Event for #ident {
                    const EVENT_TYPES: &'static [&'static str] = &[#name];

                    #[inline]
                    fn event_type(&self) -> &'static str {
                        #name
                    }

                    #[inline]
                    fn event_version(&self) -> u16 {
                        #version
                    }

                    fn encode(&self) -> ::core::result::Result<::std::string::String, #krate::EncodeError> {
                        #(#finite_checks)*
                        #krate::__private::serde_json::to_string(self)
                            .map_err(|source| #krate::EncodeError::Json { event_type: #name, source })
                    }

                    fn decode(
                        event_type: &str,
                        event_version: u16,
                        payload: &str,
                    ) -> ::core::result::Result<Self, #krate::DecodeError> {
                        if event_type != #name {
                            return ::core::result::Result::Err(#krate::DecodeError::UnknownType {
                                event_type: ::std::borrow::ToOwned::to_owned(event_type),
                                expected: <Self as #krate::Event>::EVENT_TYPES,
                            });
                        }
                        #krate::__private::decode_payload::<Self>(#name, #version, event_version, payload)
                    }

                    #tags_method
                }

                #[automatically_derived]
                impl #krate::EventType for #ident {
                    const NAME: &'static str = #name;
                    const VERSION: u16 = #version;
                }
            };
        };
        if !copy {
            out.extend(unique_marker("event_named", name, ident));
        }
        if let Some(view) = &self.view {
            out.extend(unique_marker(
                "event_view_named",
                &view.ident.to_string(),
                ident,
            ));
            out.extend(view.expand(name, *version, ident, krate));
        }
        out
    }
}

/// A macro exported at the crate root under a name made of `what` and
/// `name`: a second event struct of the crate with the same name fails to
/// compile with "the name `__es_event_named_X` is defined multiple times",
/// pointing at both. (Types of different crates are compared by `migrate`.)
fn unique_marker(what: &str, name: &str, span_of: &syn::Ident) -> TokenStream {
    let mut mangled = String::new();
    for c in name.chars() {
        if c.is_ascii_alphanumeric() || c == '_' {
            mangled.push(c);
        } else {
            mangled.push_str(&format!("_u{:x}_", c as u32));
        }
    }
    let marker = format_ident!("__es_{}_{}", what, mangled, span = span_of.span());
    quote::quote_spanned! {span_of.span()=>
        const _: () = {
            #[doc(hidden)]
            #[macro_export]
            macro_rules! #marker { () => {} }
        };
    }
}

/// Whether a field type is `f32`/`f64` (`Some(false)`) or an `Option` of one.
fn float_field(ty: &syn::Type) -> Option<bool> {
    let is_float = |ty: &syn::Type| match ty {
        syn::Type::Path(p) if p.qself.is_none() => p.path.is_ident("f32") || p.path.is_ident("f64"),
        _ => false,
    };
    if is_float(ty) {
        return Some(false);
    }
    option_inner(ty)
        .filter(|inner| is_float(inner))
        .map(|_| true)
}

impl View {
    fn expand(
        &self,
        event_type: &str,
        version: u16,
        rust_ident: &syn::Ident,
        krate: &syn::Path,
    ) -> TokenStream {
        let view = &self.ident;
        let view_name = view.to_string();
        let descriptors = self.columns.iter().map(|c| {
            let name = c.ident.to_string();
            let name = name.trim_start_matches("r#");
            let key = &c.json_key;
            let kind = format_ident!("{}", c.kind);
            let nullable = c.nullable;
            quote! {
                #krate::__private::ViewColumn {
                    name: #name,
                    json_key: #key,
                    ty: #krate::__private::ColumnType::#kind,
                    nullable: #nullable,
                }
            }
        });
        let columns = self.columns.iter().map(|c| {
            let ident = &c.ident;
            let sql = match c.kind {
                "Json" => format_ident!("Text"),
                k => format_ident!("{}", k),
            };
            let doc = format!("Payload field `{}`.", c.json_key);
            if c.nullable {
                quote! { #[doc = #doc] #ident -> Nullable<#sql>, }
            } else {
                quote! { #[doc = #doc] #ident -> #sql, }
            }
        });
        let doc = format!(
            "Typed view `{view_name}` over the log: one row per `{event_type}` event stored at version {version} (older versions are read through the store, which upcasts them). Created by the store's `migrate`."
        );
        quote! {
            #krate::__private::inventory::submit! {
                #krate::__private::EventView {
                    name: #view_name,
                    event_type: #event_type,
                    event_version: #version,
                    rust_type: ::core::concat!(::core::module_path!(), "::", ::core::stringify!(#rust_ident)),
                    columns: &[#(#descriptors),*],
                }
            }

            diesel::table! {
                #[doc = #doc]
                #view (global_position) {
                    /// Position of the event in the whole log.
                    global_position -> BigInt,
                    /// Stream the event belongs to.
                    stream_id -> Text,
                    /// Version of the event in its stream.
                    stream_version -> BigInt,
                    /// When the store appended the event (UTC).
                    created_at -> Timestamp,
                    #(#columns)*
                }
            }
        }
    }
}

fn parse_field_attrs(field: &syn::Field) -> syn::Result<bool> {
    let mut json = false;
    for attr in field.attrs.iter().filter(|a| a.path().is_ident("event")) {
        attr.parse_nested_meta(|meta| {
            if meta.path.is_ident("json") {
                if json {
                    return Err(meta.error("duplicate `json` attribute; give it once"));
                }
                json = true;
                Ok(())
            } else {
                Err(meta.error(format!(
                    "unknown event field attribute `{}`; the only one is #[event(json)]",
                    path_text(&meta.path)
                )))
            }
        })?;
    }
    Ok(json)
}

fn serde_container_rename_all(input: &DeriveInput) -> Option<syn::Attribute> {
    input
        .attrs
        .iter()
        .filter(|a| a.path().is_ident("serde"))
        .find(|a| {
            let mut found = false;
            let _ = a.parse_nested_meta(|meta| {
                if meta.path.is_ident("rename_all") {
                    found = true;
                }
                if meta.input.peek(syn::Token![=]) {
                    let _: syn::Expr = meta.value()?.parse()?;
                } else if meta.input.peek(syn::token::Paren) {
                    let _content;
                    syn::parenthesized!(_content in meta.input);
                }
                Ok(())
            });
            found
        })
        .cloned()
}

fn serde_items(field: &syn::Field) -> Vec<(String, Option<LitStr>)> {
    let mut items = Vec::new();
    for attr in field.attrs.iter().filter(|a| a.path().is_ident("serde")) {
        let _ = attr.parse_nested_meta(|meta| {
            let key = path_text(&meta.path);
            if meta.input.peek(syn::Token![=]) {
                let expr: syn::Expr = meta.value()?.parse()?;
                let lit = match expr {
                    syn::Expr::Lit(syn::ExprLit {
                        lit: syn::Lit::Str(s),
                        ..
                    }) => Some(s),
                    _ => None,
                };
                items.push((key, lit));
            } else {
                if meta.input.peek(syn::token::Paren) {
                    let _content;
                    syn::parenthesized!(_content in meta.input);
                }
                items.push((key, None));
            }
            Ok(())
        });
    }
    items
}

fn has_serde_flag(field: &syn::Field, flag: &str) -> bool {
    serde_items(field).iter().any(|(k, _)| k == flag)
}

fn serde_rename(field: &syn::Field) -> Option<String> {
    serde_items(field)
        .into_iter()
        .find(|(k, _)| k == "rename")
        .and_then(|(_, lit)| lit.map(|l| l.value()))
}

fn is_option(ty: &syn::Type) -> bool {
    option_inner(ty).is_some()
}

fn option_inner(ty: &syn::Type) -> Option<&syn::Type> {
    let syn::Type::Path(p) = ty else { return None };
    let seg = p.path.segments.last()?;
    if seg.ident != "Option" {
        return None;
    }
    let syn::PathArguments::AngleBracketed(args) = &seg.arguments else {
        return None;
    };
    match args.args.first()? {
        syn::GenericArgument::Type(inner) => Some(inner),
        _ => None,
    }
}

/// Why a field type has no view column.
enum Unmapped {
    /// An integer wider than BIGINT: `u64`, `usize`, `u128`, `i128`.
    TooWide(&'static str),
    Other,
}

/// The view column type of a field type, and whether it is nullable.
fn column_kind(ty: &syn::Type) -> Result<(&'static str, bool), Unmapped> {
    if let Some(inner) = option_inner(ty) {
        return match column_kind(inner)? {
            (_, true) => Err(Unmapped::Other),
            (k, false) => Ok((k, true)),
        };
    }
    let syn::Type::Path(p) = ty else {
        return Err(Unmapped::Other);
    };
    if p.qself.is_some() {
        return Err(Unmapped::Other);
    }
    let Some(seg) = p.path.segments.last() else {
        return Err(Unmapped::Other);
    };
    if !seg.arguments.is_empty() {
        return Err(Unmapped::Other);
    }
    let kind = match seg.ident.to_string().as_str() {
        "i8" | "u8" | "i16" => "SmallInt",
        "u16" | "i32" => "Integer",
        "u32" | "i64" | "isize" => "BigInt",
        "u64" => return Err(Unmapped::TooWide("u64")),
        "usize" => return Err(Unmapped::TooWide("usize")),
        "u128" => return Err(Unmapped::TooWide("u128")),
        "i128" => return Err(Unmapped::TooWide("i128")),
        "f32" => "Float",
        "f64" => "Double",
        "bool" => "Bool",
        "String" | "char" | "Uuid" => "Text",
        _ => return Err(Unmapped::Other),
    };
    Ok((kind, false))
}

struct EnumModel<'a> {
    ident: &'a syn::Ident,
    krate: syn::Path,
    variants: Vec<(&'a syn::Ident, &'a syn::Type)>,
}

impl<'a> EnumModel<'a> {
    fn parse(input: &'a DeriveInput, data: &'a syn::DataEnum) -> syn::Result<Self> {
        let mut errors = Errors::default();
        let attrs = parse_container_attrs(input, &mut errors);
        if let Some((_, lit)) = &attrs.name {
            errors.spanned(lit, "`name` belongs on each event struct, not on the enum that groups them; remove it here");
        }
        if attrs.version.is_some() || attrs.view.is_some() || attrs.copy.is_some() {
            errors.spanned(&input.ident, "`version`, `view` and `copy` belong on each event struct, not on the enum that groups them; remove them here");
        }
        if !attrs.tags.is_empty() || attrs.tags_fn.is_some() {
            errors.spanned(&input.ident, "`tag` and `tags` belong on each event struct, not on the enum that groups them (its events keep their own tags); move them to the structs");
        }
        if !input.generics.params.is_empty() {
            errors.spanned(&input.generics, "an event enum cannot be generic");
        }
        if data.variants.is_empty() {
            errors.spanned(&input.ident, "an event enum needs at least one variant wrapping an event struct, e.g. `BookBorrowed(BookBorrowed)`");
        }
        let mut variants = Vec::new();
        for v in &data.variants {
            match &v.fields {
                Fields::Unnamed(f) if f.unnamed.len() == 1 => {
                    variants.push((&v.ident, &f.unnamed[0].ty));
                }
                _ => errors.spanned(v, format!(
                    "each variant of an event enum wraps one event struct; write `{0}({0})` and #[derive(Event)] on `struct {0}`",
                    v.ident
                )),
            }
        }
        errors.finish()?;
        Ok(EnumModel {
            ident: &input.ident,
            krate: attrs.krate.unwrap_or_else(default_crate),
            variants,
        })
    }

    fn expand(&self) -> TokenStream {
        let EnumModel {
            ident,
            krate,
            variants,
        } = self;
        let names: Vec<_> = variants.iter().map(|(v, _)| v).collect();
        let tys: Vec<_> = variants.iter().map(|(_, t)| t).collect();
        quote! {
            const _: () = {
                #[automatically_derived]
                impl #krate::Event for #ident {
                    const EVENT_TYPES: &'static [&'static str] = &[#(<#tys as #krate::EventType>::NAME),*];

                    fn event_type(&self) -> &'static str {
                        match self {
                            #(Self::#names(e) => <#tys as #krate::EventType>::NAME,)*
                        }
                    }

                    fn event_version(&self) -> u16 {
                        match self {
                            #(Self::#names(_) => <#tys as #krate::EventType>::VERSION,)*
                        }
                    }

                    fn encode(&self) -> ::core::result::Result<::std::string::String, #krate::EncodeError> {
                        match self {
                            #(Self::#names(e) => <#tys as #krate::Event>::encode(e),)*
                        }
                    }

                    fn tags(&self) -> ::std::vec::Vec<::std::string::String> {
                        match self {
                            #(Self::#names(e) => <#tys as #krate::Event>::tags(e),)*
                        }
                    }

                    fn decode(
                        event_type: &str,
                        event_version: u16,
                        payload: &str,
                    ) -> ::core::result::Result<Self, #krate::DecodeError> {
                        #(
                            if event_type == <#tys as #krate::EventType>::NAME {
                                return <#tys as #krate::Event>::decode(event_type, event_version, payload).map(Self::#names);
                            }
                        )*
                        ::core::result::Result::Err(#krate::DecodeError::UnknownType {
                            event_type: ::std::borrow::ToOwned::to_owned(event_type),
                            expected: <Self as #krate::Event>::EVENT_TYPES,
                        })
                    }
                }

                #(
                    #[automatically_derived]
                    impl ::core::convert::From<#tys> for #ident {
                        fn from(event: #tys) -> Self {
                            Self::#names(event)
                        }
                    }
                )*
            };
        }
    }
}
