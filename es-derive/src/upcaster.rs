//! `#[upcaster(Event, from = N)]`: attribute -> checked model -> tokens.

use crate::attr::Errors;
use proc_macro2::{Span, TokenStream};
use quote::{quote, ToTokens};
use syn::parse::Parser;
use syn::punctuated::Punctuated;
use syn::spanned::Spanned;
use syn::{Expr, ExprLit, FnArg, ItemFn, Lit, Meta, ReturnType, Token};

const USAGE: &str = "#[upcaster(BookBorrowed, from = 1)]";
const SIGNATURE: &str = "fn(serde_json::Value) -> Result<serde_json::Value, E>";

pub fn expand(args: TokenStream, item: TokenStream) -> TokenStream {
    match expand_inner(args, item.clone()) {
        Ok(tokens) => tokens,
        // Keep the function so that its callers do not report follow-up errors.
        Err(err) => {
            let mut out = err.to_compile_error();
            out.extend(item);
            out
        }
    }
}

pub fn expand_inner(args: TokenStream, item: TokenStream) -> syn::Result<TokenStream> {
    let item: syn::Item = syn::parse2(item)?;
    let func = match item {
        syn::Item::Fn(func) => func,
        other => {
            return Err(syn::Error::new_spanned(
                other,
                format!("#[upcaster] goes on a function `{SIGNATURE}` that turns a payload of version N into version N + 1"),
            ))
        }
    };
    let mut errors = Errors::default();
    let attrs = parse_args(args, &mut errors);
    check_signature(&func, &mut errors);
    errors.finish()?;
    let (Some(event), Some(from)) = (attrs.event, attrs.from) else {
        return Err(syn::Error::new(Span::call_site(), format!("write {USAGE}")));
    };
    let krate = attrs
        .krate
        .unwrap_or_else(|| syn::parse_quote!(::es_diesel::__private::es_core));
    Ok(Model {
        func,
        event,
        from,
        krate,
    }
    .expand())
}

struct Args {
    event: Option<syn::Path>,
    from: Option<u16>,
    krate: Option<syn::Path>,
}

fn parse_args(args: TokenStream, errors: &mut Errors) -> Args {
    let mut out = Args {
        event: None,
        from: None,
        krate: None,
    };
    let metas = match Punctuated::<Meta, Token![,]>::parse_terminated.parse2(args) {
        Ok(metas) => metas,
        Err(err) => {
            errors.push(syn::Error::new(
                err.span(),
                format!(
                    "{err}; write the event type and the version it converts from, e.g. {USAGE}"
                ),
            ));
            return out;
        }
    };
    for meta in &metas {
        match meta {
            Meta::Path(path) if out.event.is_none() => out.event = Some(path.clone()),
            Meta::Path(path) => errors.spanned(path, format!("an upcaster converts one event type; write {USAGE}")),
            Meta::NameValue(nv) if nv.path.is_ident("from") => {
                if out.from.is_some() {
                    errors.spanned(nv, "duplicate `from`; give it once");
                    continue;
                }
                match &nv.value {
                    Expr::Lit(ExprLit { lit: Lit::Int(int), .. }) => match int.base10_parse::<u16>() {
                        Ok(0) => errors.spanned(int, "event versions start at 1, so the oldest upcaster is `from = 1` (it turns version 1 into version 2)"),
                        Ok(v) => out.from = Some(v),
                        Err(_) => errors.spanned(int, "`from` must fit in 1..=65535, e.g. from = 1"),
                    },
                    other => errors.spanned(other, "`from` takes the stored version as an integer literal, e.g. from = 1"),
                }
            }
            Meta::NameValue(nv) if nv.path.is_ident("crate") => {
                match syn::parse2::<syn::Path>(nv.value.to_token_stream()) {
                    Ok(path) if out.krate.is_none() => out.krate = Some(path),
                    Ok(_) => errors.spanned(nv, "duplicate `crate`; give it once"),
                    Err(_) => errors.spanned(&nv.value, "`crate` takes a path, e.g. crate = es_core"),
                }
            }
            other => errors.spanned(
                other,
                format!("unknown upcaster argument; expected the event type, `from = N` and optionally `crate = path`, e.g. {USAGE}"),
            ),
        }
    }
    if out.event.is_none() {
        errors.push(syn::Error::new(
            Span::call_site(),
            format!("name the event type this upcaster converts: {USAGE}"),
        ));
    }
    if out.from.is_none() && !errors_has_from(&metas) {
        errors.push(syn::Error::new(
            Span::call_site(),
            format!(
                "say which stored version this upcaster converts (to that version + 1): {USAGE}"
            ),
        ));
    }
    out
}

/// Whether a `from = ..` was written (and so already reported if invalid).
fn errors_has_from(metas: &Punctuated<Meta, Token![,]>) -> bool {
    metas
        .iter()
        .any(|m| matches!(m, Meta::NameValue(nv) if nv.path.is_ident("from")))
}

fn check_signature(func: &ItemFn, errors: &mut Errors) {
    let sig = &func.sig;
    if let Some(asyncness) = &sig.asyncness {
        errors.spanned(
            asyncness,
            format!("an upcaster runs inside every read and cannot be async; write `{SIGNATURE}`"),
        );
    }
    if !sig.generics.params.is_empty() || sig.generics.where_clause.is_some() {
        errors.spanned(
            &sig.generics,
            format!("an upcaster cannot be generic; write `{SIGNATURE}`"),
        );
    }
    if let Some(variadic) = &sig.variadic {
        errors.spanned(
            variadic,
            format!("an upcaster takes one argument; write `{SIGNATURE}`"),
        );
    }
    match sig.inputs.len() {
        1 => {
            if let Some(FnArg::Receiver(receiver)) = sig.inputs.first() {
                errors.spanned(
                    receiver,
                    format!("an upcaster is a free function, not a method; write `{SIGNATURE}`"),
                );
            }
        }
        0 => errors.spanned(
            &sig.ident,
            format!(
                "an upcaster takes the stored payload as its one argument; write `{SIGNATURE}`"
            ),
        ),
        _ => errors.spanned(
            &sig.inputs,
            format!(
                "an upcaster takes exactly one argument, the stored payload; write `{SIGNATURE}`"
            ),
        ),
    }
    if let ReturnType::Default = sig.output {
        errors.spanned(
            &sig.ident,
            format!("an upcaster returns the converted payload or an error; write `{SIGNATURE}`, where E converts into a boxed error (String, &str, any std::error::Error)"),
        );
    }
}

struct Model {
    func: ItemFn,
    event: syn::Path,
    from: u16,
    krate: syn::Path,
}

impl Model {
    fn expand(&self) -> TokenStream {
        let Model {
            func,
            event,
            from,
            krate,
        } = self;
        let ident = &func.sig.ident;
        // Spanned on the user's signature, so a wrong argument or return type
        // is reported there as a mismatch with the expected fn type.
        let typed = quote::quote_spanned! {func.sig.span()=>
            let upcaster: fn(
                #krate::__private::serde_json::Value,
            ) -> ::core::result::Result<#krate::__private::serde_json::Value, _> = #ident;
        };
        let name = ident.to_string();
        let event_text = event.to_token_stream().to_string().replace(' ', "");
        let too_new = format!(
            "#[upcaster({event_text}, from = {from})] converts version {from} to {}, but `{event_text}` is not above version {from}: raise #[event(version = ..)] on `{event_text}`, or fix `from`",
            u32::from(*from) + 1
        );
        quote! {
            #func

            #krate::__private::inventory::submit! {
                #krate::upcast::Upcaster {
                    event_type: <#event as #krate::EventType>::NAME,
                    from_version: {
                        const _: () = ::core::assert!(#from < <#event as #krate::EventType>::VERSION, #too_new);
                        #from
                    },
                    upcast: {
                        fn upcast(
                            payload: #krate::__private::serde_json::Value,
                        ) -> ::core::result::Result<#krate::__private::serde_json::Value, #krate::BoxError> {
                            #typed
                            upcaster(payload).map_err(::core::convert::Into::into)
                        }
                        upcast
                    },
                    name: ::core::concat!(::core::module_path!(), "::", #name),
                }
            }
        }
    }
}
