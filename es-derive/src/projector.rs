//! `#[projector(on = .., read_model = .., key = ..)]`: attributes -> checked
//! model -> tokens.

use crate::attr::{Errors, Once};
use proc_macro2::{Span, TokenStream};
use quote::{format_ident, quote, quote_spanned};
use syn::parse::Parser;
use syn::spanned::Spanned;
use syn::{FnArg, ItemFn, LitStr, Type};

pub fn expand(args: TokenStream, item: TokenStream) -> TokenStream {
    let func: ItemFn = match syn::parse2(item.clone()) {
        Ok(f) => f,
        Err(_) => {
            let mut out = syn::Error::new(
                Span::call_site(),
                "#[projector] goes on a function: `fn borrowed(e: &Recorded<BookBorrowed>, conn: &mut DbConnection) -> QueryResult<()>`",
            )
            .to_compile_error();
            out.extend(item);
            return out;
        }
    };
    match expand_inner(args, &func) {
        Ok(tokens) => tokens,
        Err(err) => {
            // Keep the function, so calls to it do not add follow-up errors.
            let mut out = err.to_compile_error();
            out.extend(quote!(#func));
            out
        }
    }
}

struct Attrs {
    on: Vec<syn::Path>,
    on_span: Span,
    read_model: Option<Type>,
    key: Option<Vec<syn::Ident>>,
    name: Option<LitStr>,
}

fn parse_attrs(args: TokenStream) -> syn::Result<Attrs> {
    let mut on = Once::new("on");
    let mut read_model = Once::new("read_model");
    let mut key = Once::new("key");
    let mut name = Once::new("name");
    let mut on_span = Span::call_site();
    let parser = syn::meta::parser(|meta| {
        if meta.path.is_ident("on") {
            on_span = meta.path.span();
            let value = meta.value()?;
            let types: Vec<syn::Path> = if value.peek(syn::token::Bracket) {
                let content;
                syn::bracketed!(content in value);
                content
                    .parse_terminated(<syn::Path as syn::parse::Parse>::parse, syn::Token![,])?
                    .into_iter()
                    .collect()
            } else {
                vec![value.parse()?]
            };
            if types.is_empty() {
                return Err(meta.error("list the event types, e.g. #[projector(on = [BookBorrowed, BookReturned], ..)]"));
            }
            on.set(&meta, types)
        } else if meta.path.is_ident("read_model") {
            read_model.set(&meta, meta.value()?.parse::<Type>()?)
        } else if meta.path.is_ident("key") {
            let value = meta.value()?;
            let fields: Vec<syn::Ident> = if value.peek(syn::token::Paren) {
                let content;
                syn::parenthesized!(content in value);
                content
                    .parse_terminated(<syn::Ident as syn::parse::Parse>::parse, syn::Token![,])?
                    .into_iter()
                    .collect()
            } else {
                vec![value.parse()?]
            };
            if fields.is_empty() {
                return Err(meta.error("name the event fields holding the key, e.g. key = book_id or key = (library_id, book_id)"));
            }
            key.set(&meta, fields)
        } else if meta.path.is_ident("name") {
            let lit: LitStr = meta.value()?.parse()?;
            if lit.value().trim().is_empty() {
                return Err(syn::Error::new_spanned(
                    &lit,
                    "a projector name cannot be empty",
                ));
            }
            name.set(&meta, lit)
        } else {
            let path = &meta.path;
            Err(meta.error(format!(
                "unknown projector attribute `{}`; expected: on = Event | [EventA, EventB], read_model = Type, key = field | (field_a, field_b), name = \"..\"",
                quote!(#path).to_string().replace(' ', "")
            )))
        }
    });
    parser.parse2(args)?;
    let Some(on) = on.get() else {
        return Err(syn::Error::new(
            Span::call_site(),
            "a projector names the events it handles: #[projector(on = BookBorrowed, ..)] or #[projector(on = [BookBorrowed, BookReturned], ..)]",
        ));
    };
    Ok(Attrs {
        on,
        on_span,
        read_model: read_model.get(),
        key: key.get(),
        name: name.get(),
    })
}

enum Style {
    /// Second parameter `&mut Option<Model>`.
    Row { model: Type, key: Vec<syn::Ident> },
    /// Second parameter is the connection.
    Sql { model: Type },
}

struct Model<'a> {
    func: &'a ItemFn,
    on: Vec<syn::Path>,
    /// `P` of `&Recorded<P>` or `&P`.
    event_param: &'a Type,
    /// Whether it takes `&Recorded<P>`: rebuilds of a read model whose
    /// projectors all take `&P` read no envelope columns.
    reads_envelope: bool,
    style: Style,
    /// `read_model = ..` when a row-level projector names it too.
    declared_model: Option<Type>,
    name: Option<LitStr>,
}

fn expand_inner(args: TokenStream, func: &ItemFn) -> syn::Result<TokenStream> {
    let attrs = parse_attrs(args)?;
    let model = Model::check(attrs, func)?;
    Ok(model.expand())
}

/// `(P, true)` when `ty` is `&Recorded<P>` (the event with its envelope),
/// `(P, false)` when it is `&P` (the event's values alone).
fn event_param(ty: &Type) -> Option<(&Type, bool)> {
    let Type::Reference(r) = ty else { return None };
    if r.mutability.is_some() {
        return None;
    }
    let Type::Path(p) = &*r.elem else { return None };
    let seg = p.path.segments.last()?;
    if seg.ident != "Recorded" {
        return Some((&*r.elem, false));
    }
    let syn::PathArguments::AngleBracketed(args) = &seg.arguments else {
        return None;
    };
    if args.args.len() != 1 {
        return None;
    }
    match &args.args[0] {
        syn::GenericArgument::Type(t) => Some((t, true)),
        _ => None,
    }
}

/// `Some(M)` when `ty` is `&mut Option<M>`, `None` for another `&mut T`,
/// `Err` when it is not a mutable reference.
fn row_param(ty: &Type) -> Result<Option<&Type>, ()> {
    let Type::Reference(r) = ty else {
        return Err(());
    };
    if r.mutability.is_none() {
        return Err(());
    }
    let Type::Path(p) = &*r.elem else {
        return Ok(None);
    };
    let Some(seg) = p.path.segments.last() else {
        return Ok(None);
    };
    if seg.ident != "Option" {
        return Ok(None);
    }
    let syn::PathArguments::AngleBracketed(args) = &seg.arguments else {
        return Ok(None);
    };
    match args.args.first() {
        Some(syn::GenericArgument::Type(t)) => Ok(Some(t)),
        _ => Ok(None),
    }
}

impl<'a> Model<'a> {
    fn check(attrs: Attrs, func: &'a ItemFn) -> syn::Result<Self> {
        let mut errors = Errors::default();
        let sig = &func.sig;
        if let Some(a) = &sig.asyncness {
            errors.spanned(a, "a projector runs inside the append transaction and cannot be async; remove `async`");
        }
        if !sig.generics.params.is_empty() {
            errors.spanned(
                &sig.generics,
                "a projector cannot be generic: it handles the concrete event types listed in `on`",
            );
        }
        let inputs: Vec<&FnArg> = sig.inputs.iter().collect();
        if let Some(FnArg::Receiver(r)) = inputs.first() {
            errors.spanned(
                r,
                "a projector is a free function, not a method; remove `self`",
            );
            return Err(errors.finish().unwrap_err());
        }
        let typed: Vec<&syn::PatType> = inputs
            .iter()
            .filter_map(|a| match a {
                FnArg::Typed(t) => Some(t),
                FnArg::Receiver(_) => None,
            })
            .collect();
        if typed.len() != 2 {
            let example = if attrs.key.is_some() {
                "(e: &Recorded<BookBorrowed>, row: &mut Option<BookList>)"
            } else {
                "(e: &Recorded<BookBorrowed>, conn: &mut DbConnection)"
            };
            let msg = format!(
                "a projector takes two parameters, the recorded event and {}: `fn {}{example}`",
                if attrs.key.is_some() {
                    "the row"
                } else {
                    "the connection"
                },
                sig.ident
            );
            if sig.inputs.is_empty() {
                errors.spanned(&sig.ident, msg);
            } else {
                errors.spanned(&sig.inputs, msg);
            }
            return Err(errors.finish().unwrap_err());
        }
        let event_param = event_param(&typed[0].ty);
        if event_param.is_none() {
            let first = attrs
                .on
                .first()
                .map(|p| quote!(#p).to_string().replace(' ', ""))
                .unwrap_or_else(|| "BookBorrowed".into());
            let mutable = matches!(&*typed[0].ty, Type::Reference(r) if r.mutability.is_some());
            let msg = if mutable {
                format!("a projector cannot change the event it is given (the log is immutable): take `e: &{first}`, or `e: &Recorded<{first}>`, without `mut`")
            } else {
                format!("the first parameter of a projector is the event, by reference: `e: &{first}`, or `e: &Recorded<{first}>` to read its position, stream, metadata or time too")
            };
            errors.spanned(&typed[0].ty, msg);
        }
        let second = &typed[1].ty;
        let style = match (row_param(second), attrs.key) {
            (Ok(Some(model)), Some(key)) => Some(Style::Row {
                model: model.clone(),
                key,
            }),
            (Ok(Some(model)), None) => {
                errors.spanned(second, format!(
                    "a row-level projector (taking `&mut Option<{}>`) needs the event field that holds the row's key: add `key = <field>` to #[projector(..)]",
                    quote!(#model).to_string().replace(' ', "")
                ));
                None
            }
            (Ok(None), None) => match &attrs.read_model {
                Some(model) => Some(Style::Sql {
                    model: model.clone(),
                }),
                None => {
                    errors.push(syn::Error::new(attrs.on_span, "a SQL-level projector names the read model it feeds: #[projector(on = .., read_model = BookList)]"));
                    None
                }
            },
            (Ok(None), Some(key)) => {
                errors.spanned(second, format!(
                    "with `key = {}` the projector is row-level and its second parameter is the row: `row: &mut Option<BookList>`; or remove `key` to receive the connection",
                    key.iter().map(|k| k.to_string()).collect::<Vec<_>>().join(", ")
                ));
                None
            }
            (Err(()), key) => {
                let hint = if key.is_some() {
                    "`row: &mut Option<BookList>`"
                } else {
                    "`conn: &mut DbConnection`"
                };
                errors.spanned(
                    second,
                    format!("the second parameter of a projector is a mutable reference: {hint}"),
                );
                None
            }
        };
        errors.finish()?;
        let declared_model = match &style {
            Some(Style::Row { .. }) => attrs.read_model,
            _ => None,
        };
        let (event_param, reads_envelope) = event_param.expect("checked above");
        Ok(Model {
            func,
            on: attrs.on,
            event_param,
            reads_envelope,
            style: style.expect("checked above"),
            declared_model,
            name: attrs.name,
        })
    }

    fn expand(&self) -> TokenStream {
        let func = self.func;
        let fn_ident = &func.sig.ident;
        let fn_name = fn_ident.to_string();
        let param = self.event_param;
        let name = match &self.name {
            Some(lit) => quote!(#lit),
            None => quote!(::core::concat!(::core::module_path!(), "::", #fn_name)),
        };
        let (model, style) = match &self.style {
            Style::Row { model, .. } => (model, quote!(Row)),
            Style::Sql { model } => (model, quote!(Sql)),
        };
        let model_check = match &self.declared_model {
            Some(declared) => {
                let span = declared.span();
                quote_spanned! {span=>
                    const _: ::core::marker::PhantomData<#declared> = ::core::marker::PhantomData::<#model>;
                }
            }
            None => TokenStream::new(),
        };
        let mut impls = Vec::new();
        let mut handlers = Vec::new();
        for (i, event) in self.on.iter().enumerate() {
            let span = event.span();
            let holder = format_ident!("__Projector{}", i);
            let arg = if self.reads_envelope {
                quote!(&event)
            } else {
                quote!(&event.event)
            };
            let output = quote_spanned! {func.sig.output.span()=>
                <_ as __es::ProjectorOutput>::into_result(#fn_ident(#arg, row_or_conn))
            };
            let hold = quote_spanned! {param.span()=>
                event.map(<#param as __es::HoldsEvent<#event>>::hold)
            };
            match &self.style {
                Style::Row { key, .. } => {
                    let key_expr = if key.len() == 1 {
                        let k = &key[0];
                        quote_spanned!(k.span()=> ::core::convert::Into::into(::core::clone::Clone::clone(&event.event.#k)))
                    } else {
                        let parts = key.iter().map(|k| quote_spanned!(k.span()=> ::core::convert::Into::into(::core::clone::Clone::clone(&event.event.#k))));
                        quote!((#(#parts,)*))
                    };
                    impls.push(quote_spanned! {span=>
                        struct #holder;
                        #[automatically_derived]
                        impl __es::RowProjection<#event> for #holder {
                            type Model = #model;
                            fn key(event: &__es::es_core::Recorded<#event>) -> <#model as __es::ReadModel>::Key {
                                #key_expr
                            }
                            fn apply(
                                event: __es::es_core::Recorded<#event>,
                                row_or_conn: &mut ::core::option::Option<#model>,
                            ) -> ::core::result::Result<(), __es::es_core::BoxError> {
                                let event: __es::es_core::Recorded<#param> = #hold;
                                #output
                            }
                        }
                    });
                    handlers.push(quote_spanned!(span=> __es::row_handler::<#holder, #event>()));
                }
                Style::Sql { .. } => {
                    impls.push(quote_spanned! {span=>
                        struct #holder;
                        #[automatically_derived]
                        impl __es::SqlProjection<#event> for #holder {
                            fn apply(
                                event: __es::es_core::Recorded<#event>,
                                row_or_conn: &mut __es::DbConnection,
                            ) -> ::core::result::Result<(), __es::es_core::BoxError> {
                                let event: __es::es_core::Recorded<#param> = #hold;
                                #output
                            }
                        }
                    });
                    handlers.push(quote_spanned!(span=> __es::sql_handler::<#holder, #event>()));
                }
            }
        }
        let n = handlers.len();
        let reads_envelope = self.reads_envelope;
        quote! {
            #func

            const _: () = {
                use ::es_diesel::__private as __es;

                #model_check
                #(#impls)*

                static __HANDLERS: [__es::Handler; #n] = [#(#handlers),*];

                __es::inventory::submit! {
                    __es::Projector {
                        name: #name,
                        read_model: <#model as __es::ReadModel>::SCHEMA.name,
                        style: __es::ProjectorStyle::#style,
                        handlers: &__HANDLERS,
                        reads_envelope: #reads_envelope,
                        file: ::core::file!(),
                        line: ::core::line!(),
                    }
                }
            };
        }
    }
}
