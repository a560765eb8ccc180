//! `#[derive(ReadModel)]`: attributes -> checked model -> tokens.

use crate::attr::{snake_case, Errors, Once};
use proc_macro2::TokenStream;
use quote::{format_ident, quote, quote_spanned};
use syn::{Data, DeriveInput, Fields, LitStr};

/// Diesel is built without its `32-column-tables` feature.
const MAX_COLUMNS: usize = 16;

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

/// Keeps follow-up errors (in projectors naming this type) away.
fn fallback(input: &DeriveInput) -> TokenStream {
    if !input.generics.params.is_empty() {
        return TokenStream::new();
    }
    let ident = &input.ident;
    let name = ident.to_string();
    quote! {
        const _: () = {
            use ::es_diesel::__private as __es;
            #[automatically_derived]
            impl __es::ReadModel for #ident {
                const SCHEMA: __es::ReadModelSchema = __es::ReadModelSchema {
                    name: #name, rust_type: #name, version: 0, asynchronous: false, columns: 0, sqlite: &[], postgres: &[], mysql: &[],
                };
                type Key = ();
                fn key(&self) {}
                fn find(_: &mut __es::DbConnection, _: &()) -> __es::diesel::QueryResult<::core::option::Option<Self>> { unreachable!() }
                fn find_many(_: &mut __es::DbConnection, _: &[()]) -> __es::diesel::QueryResult<::std::vec::Vec<Self>> { unreachable!() }
                fn insert_many(_: &mut __es::DbConnection, _: &[Self]) -> __es::diesel::QueryResult<usize> { unreachable!() }
                fn update(_: &mut __es::DbConnection, _: &Self) -> __es::diesel::QueryResult<usize> { unreachable!() }
                fn delete_many(_: &mut __es::DbConnection, _: &[()]) -> __es::diesel::QueryResult<usize> { unreachable!() }
            }
        };
    }
}

/// The column type of a field, common to every backend of `DbConnection`.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    SmallInt,
    Integer,
    BigInt,
    Float,
    Double,
    Bool,
    Text,
    Binary,
    Timestamp,
    Date,
    Time,
    /// `DateTime<Utc>`, stored as a UTC `Timestamp`.
    TimestampUtc,
    /// `uuid::Uuid`, stored as hyphenated text.
    Uuid,
    /// `serde_json::Value`, stored as JSON text.
    Json,
}

impl Kind {
    fn sql(self) -> &'static str {
        match self {
            Kind::SmallInt => "SmallInt",
            Kind::Integer => "Integer",
            Kind::BigInt => "BigInt",
            Kind::Float => "Float",
            Kind::Double => "Double",
            Kind::Bool => "Bool",
            Kind::Text | Kind::Uuid | Kind::Json => "Text",
            Kind::Binary => "Binary",
            Kind::Timestamp | Kind::TimestampUtc => "Timestamp",
            Kind::Date => "Date",
            Kind::Time => "Time",
        }
    }

    fn ddl(self, db: Db) -> &'static str {
        let postgres = db == Db::Postgres;
        if db == Db::Mysql {
            return self.mysql_ddl();
        }
        match self {
            Kind::SmallInt => "SMALLINT",
            Kind::Integer => "INTEGER",
            Kind::BigInt => "BIGINT",
            Kind::Float => "REAL",
            Kind::Double if postgres => "DOUBLE PRECISION",
            Kind::Double => "DOUBLE",
            Kind::Bool => "BOOLEAN",
            Kind::Text | Kind::Uuid | Kind::Json => "TEXT",
            Kind::Binary if postgres => "BYTEA",
            Kind::Binary => "BLOB",
            Kind::Timestamp | Kind::TimestampUtc => "TIMESTAMP",
            Kind::Date => "DATE",
            Kind::Time => "TIME",
        }
    }

    /// MySQL's type for a column outside any key or index: TEXT holds 64 KiB
    /// at most, so text is LONGTEXT.
    fn mysql_ddl(self) -> &'static str {
        match self {
            Kind::SmallInt => "SMALLINT",
            Kind::Integer => "INTEGER",
            Kind::BigInt => "BIGINT",
            Kind::Float => "FLOAT",
            Kind::Double => "DOUBLE",
            Kind::Bool => "BOOLEAN",
            Kind::Text | Kind::Json => "LONGTEXT",
            Kind::Uuid => "CHAR(36)",
            Kind::Binary => "LONGBLOB",
            Kind::Timestamp | Kind::TimestampUtc => "DATETIME(6)",
            Kind::Date => "DATE",
            Kind::Time => "TIME(6)",
        }
    }

    /// The helpers converting to and from the column's Rust type, if any.
    fn convert(self) -> Option<(&'static str, &'static str)> {
        match self {
            Kind::TimestampUtc => Some(("utc_to_sql", "utc_from_sql")),
            Kind::Uuid => Some(("uuid_to_sql", "uuid_from_sql")),
            Kind::Json => Some(("json_to_sql", "json_from_sql")),
            _ => None,
        }
    }
}

/// The backends the DDL is written for.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Db {
    Sqlite,
    Postgres,
    Mysql,
}

/// `name` cut to MySQL's 64 characters for identifiers, a digest of the
/// whole keeping cut names apart.
fn mysql_identifier(name: String) -> String {
    if name.chars().count() <= 64 {
        return name;
    }
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in name.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    let head: String = name.chars().take(47).collect();
    format!("{head}_{h:016x}")
}

/// InnoDB's limit on the bytes of one index entry.
const MYSQL_INDEX_BYTES: usize = 3072;

struct Field<'a> {
    ident: &'a syn::Ident,
    name: String,
    /// The type without `Option`.
    base: &'a syn::Type,
    kind: Kind,
    nullable: bool,
}

impl Field<'_> {
    /// Rust type of the column value (before conversion).
    fn row_ty(&self) -> TokenStream {
        let base = match self.kind {
            Kind::TimestampUtc => quote!(::es_diesel::__private::chrono::NaiveDateTime),
            Kind::Uuid | Kind::Json => quote!(::std::string::String),
            _ => {
                let b = self.base;
                quote!(#b)
            }
        };
        if self.nullable {
            quote!(::core::option::Option<#base>)
        } else {
            base
        }
    }

    fn sql_ty(&self) -> TokenStream {
        let sql = format_ident!("{}", self.kind.sql());
        if self.nullable {
            quote!(::es_diesel::__private::diesel::sql_types::Nullable<::es_diesel::__private::diesel::sql_types::#sql>)
        } else {
            quote!(::es_diesel::__private::diesel::sql_types::#sql)
        }
    }

    /// The column value of `value` (a reference to the field's type).
    fn to_sql(&self, value: TokenStream) -> TokenStream {
        match self.kind.convert() {
            None => quote!(::core::clone::Clone::clone(#value)),
            Some((to, _)) => {
                let to = format_ident!("{}", to);
                if self.nullable {
                    quote!(::core::option::Option::map(::core::option::Option::as_ref(#value), ::es_diesel::__private::convert::#to))
                } else {
                    quote!(::es_diesel::__private::convert::#to(#value))
                }
            }
        }
    }

    /// The field value of a column value, `?`-propagating conversion errors.
    fn field_value(&self, value: TokenStream) -> TokenStream {
        match self.kind.convert() {
            None => value,
            Some((_, from)) => {
                let from = format_ident!("{}", from);
                if self.nullable {
                    quote!(::core::option::Option::transpose(::core::option::Option::map(#value, ::es_diesel::__private::convert::#from))?)
                } else {
                    quote!(::es_diesel::__private::convert::#from(#value)?)
                }
            }
        }
    }
}

struct Model<'a> {
    ident: &'a syn::Ident,
    table: syn::Ident,
    version: u32,
    asynchronous: bool,
    fields: Vec<Field<'a>>,
    /// Indexes into `fields`.
    key: Vec<usize>,
    indexes: Vec<(bool, Vec<usize>)>,
}

pub fn derive_inner(input: &DeriveInput) -> syn::Result<TokenStream> {
    let model = Model::parse(input)?;
    Ok(model.expand())
}

enum KeySpec {
    One(syn::Ident),
    Many(Vec<syn::Ident>),
}

fn parse_idents(meta: &syn::meta::ParseNestedMeta) -> syn::Result<Vec<syn::Ident>> {
    let content;
    syn::parenthesized!(content in meta.input);
    let list =
        content.parse_terminated(<syn::Ident as syn::parse::Parse>::parse, syn::Token![,])?;
    Ok(list.into_iter().collect())
}

impl<'a> Model<'a> {
    fn parse(input: &'a DeriveInput) -> syn::Result<Self> {
        let mut errors = Errors::default();
        let mut table = Once::new("table");
        let mut key = Once::new("primary_key");
        let mut version = Once::new("version");
        let mut mode = Once::new("mode");
        let mut indexes: Vec<(bool, Vec<syn::Ident>)> = Vec::new();
        for attr in input
            .attrs
            .iter()
            .filter(|a| a.path().is_ident("read_model"))
        {
            let res = attr.parse_nested_meta(|meta| {
                if meta.path.is_ident("table") {
                    let value = meta.value()?;
                    let ident = if value.peek(LitStr) {
                        let lit: LitStr = value.parse()?;
                        syn::parse_str::<syn::Ident>(&lit.value())
                            .map(|i| syn::Ident::new(&i.to_string(), lit.span()))
                            .map_err(|_| syn::Error::new_spanned(&lit, "the table name must be a valid Rust identifier (it names the generated `table!` module), e.g. #[read_model(table = \"book_list\")]"))?
                    } else {
                        value.parse::<syn::Ident>()?
                    };
                    table.set(&meta, ident)
                } else if meta.path.is_ident("primary_key") {
                    if meta.input.peek(syn::Token![=]) {
                        key.set(&meta, KeySpec::One(meta.value()?.parse()?))
                    } else if meta.input.peek(syn::token::Paren) {
                        let cols = parse_idents(&meta)?;
                        if cols.is_empty() {
                            return Err(meta.error("name the key fields, e.g. #[read_model(primary_key(library_id, book_id))]"));
                        }
                        key.set(&meta, KeySpec::Many(cols))
                    } else {
                        Err(meta.error("write #[read_model(primary_key = field)] or #[read_model(primary_key(field_a, field_b))]"))
                    }
                } else if meta.path.is_ident("index") || meta.path.is_ident("unique_index") {
                    let unique = meta.path.is_ident("unique_index");
                    if !meta.input.peek(syn::token::Paren) {
                        return Err(meta.error("write #[read_model(index(field))] or #[read_model(index(field_a, field_b))]"));
                    }
                    let cols = parse_idents(&meta)?;
                    if cols.is_empty() {
                        return Err(meta.error("an index needs at least one field, e.g. #[read_model(index(title))]"));
                    }
                    indexes.push((unique, cols));
                    Ok(())
                } else if meta.path.is_ident("mode") {
                    let value = meta.value()?;
                    // `async` is a keyword: accept it as a token, and strings too.
                    let word = if value.peek(syn::Token![async]) {
                        value.parse::<syn::Token![async]>()?;
                        "async".to_owned()
                    } else if value.peek(LitStr) {
                        value.parse::<LitStr>()?.value()
                    } else {
                        value.parse::<syn::Ident>()?.to_string()
                    };
                    match word.as_str() {
                        "inline" => mode.set(&meta, false),
                        "async" => mode.set(&meta, true),
                        other => Err(meta.error(format!(
                            "unknown mode `{other}`; write #[read_model(mode = inline)] (the default: updated in the append transaction) or #[read_model(mode = async)] (updated by a runner after commit)"
                        ))),
                    }
                } else if meta.path.is_ident("version") {
                    let lit: syn::LitInt = meta.value()?.parse()?;
                    let v = lit.base10_parse::<u32>().map_err(|_| {
                        syn::Error::new_spanned(&lit, "`version` is a non-negative integer, e.g. #[read_model(version = 2)]")
                    })?;
                    version.set(&meta, v)
                } else {
                    let path = &meta.path;
                    Err(meta.error(format!(
                        "unknown read_model attribute `{}`; expected one of: table = \"..\", primary_key = field, primary_key(a, b), index(a, ..), unique_index(a, ..), version = N, mode = inline | async",
                        quote!(#path).to_string().replace(' ', "")
                    )))
                }
            });
            if let Err(e) = res {
                errors.push(e);
            }
        }
        if !input.generics.params.is_empty() {
            errors.spanned(
                &input.generics,
                "a read model cannot be generic: it is one concrete table",
            );
        }
        let named = match &input.data {
            Data::Struct(s) => match &s.fields {
                Fields::Named(n) => Some(n),
                _ => {
                    errors.spanned(&input.ident, "a read model is a struct with named fields, one per column: `struct BookList { book_id: i64, .. }`");
                    None
                }
            },
            _ => {
                errors.spanned(&input.ident, "a read model is a struct with named fields, one per column: `struct BookList { book_id: i64, .. }`");
                None
            }
        };
        let table = table.get().unwrap_or_else(|| {
            format_ident!(
                "{}",
                snake_case(&input.ident.to_string()),
                span = input.ident.span()
            )
        });
        let mut fields = Vec::new();
        for f in named.into_iter().flat_map(|n| n.named.iter()) {
            let ident = f.ident.as_ref().expect("named field");
            let name = ident.to_string().trim_start_matches("r#").to_owned();
            if f.attrs.iter().any(|a| a.path().is_ident("read_model")) {
                errors.spanned(f, "read_model attributes go on the struct, not on fields");
            }
            if table == name {
                errors.spanned(ident, format!("a column cannot have the name of its table `{name}` (Diesel's `table!` forbids it); rename the field or the table"));
                continue;
            }
            match classify(&f.ty) {
                Ok((base, kind, nullable)) => fields.push(Field {
                    ident,
                    name,
                    base,
                    kind,
                    nullable,
                }),
                Err(msg) => {
                    let ty = &f.ty;
                    errors.spanned(ty, format!(
                        "field `{name}` of type `{}` has no read-model column type{msg}; use one of: i16, i32, i64, f32, f64, bool, String, Vec<u8>, chrono::NaiveDateTime, chrono::NaiveDate, chrono::NaiveTime, chrono::DateTime<Utc>, uuid::Uuid, serde_json::Value, or an Option of one of them for a NULL-able column",
                        quote!(#ty).to_string().replace(' ', "")
                    ));
                }
            }
        }
        if named.is_some_and(|n| n.named.is_empty()) {
            errors.spanned(&input.ident, "a read model needs at least one field");
        }
        if fields.len() > MAX_COLUMNS {
            errors.spanned(&input.ident, format!("a read model has at most {MAX_COLUMNS} columns; this one has {}; split it into two read models", fields.len()));
        }
        let find = |errors: &mut Errors, ident: &syn::Ident, what: &str| -> Option<usize> {
            let pos = fields
                .iter()
                .position(|f| f.ident == ident || *ident == f.name);
            if pos.is_none() && named.is_some() {
                errors.spanned(
                    ident,
                    format!("{what} `{ident}` is not a field of `{}`", input.ident),
                );
            }
            pos
        };
        let key_idents = match key.get() {
            Some(KeySpec::One(i)) => vec![i],
            Some(KeySpec::Many(v)) => v,
            None => {
                errors.spanned(&input.ident, "a read model needs a primary key: add #[read_model(primary_key = field)] or #[read_model(primary_key(field_a, field_b))]");
                Vec::new()
            }
        };
        let mut key = Vec::new();
        for k in &key_idents {
            if let Some(i) = find(&mut errors, k, "primary key field") {
                let f = &fields[i];
                if key.contains(&i) {
                    errors.spanned(k, format!("`{k}` appears twice in the primary key"));
                } else if f.nullable {
                    errors.spanned(k, format!("primary key field `{k}` is an Option; key columns cannot be NULL, make it a plain type"));
                } else if matches!(f.kind, Kind::Float | Kind::Double | Kind::Json) {
                    errors.spanned(k, format!("primary key field `{k}` cannot be a float or JSON (it must be comparable for equality); use an integer, text or UUID key"));
                } else {
                    key.push(i);
                }
            }
        }
        let mut index_cols = Vec::new();
        for (unique, cols) in &indexes {
            let found: Vec<usize> = cols
                .iter()
                .filter_map(|c| find(&mut errors, c, "index field"))
                .collect();
            index_cols.push((*unique, found));
        }
        errors.finish()?;
        Ok(Model {
            ident: &input.ident,
            table,
            version: version.get().unwrap_or(1),
            asynchronous: mode.get().unwrap_or(false),
            fields,
            key,
            indexes: index_cols,
        })
    }

    fn ddl(&self, db: Db) -> Vec<String> {
        let q = |s: &str| {
            if db == Db::Mysql {
                format!("`{}`", s.replace('`', "``"))
            } else {
                format!("\"{}\"", s.replace('"', "\"\""))
            }
        };
        let table = self.table.to_string();
        let mut cols: Vec<String> = self
            .fields
            .iter()
            .enumerate()
            .map(|(i, f)| {
                let null = if f.nullable { "" } else { " NOT NULL" };
                let ty = match self.mysql_indexed_width(i) {
                    // Bytes: MySQL's text collations pad with spaces, so
                    // keys `k` and `k ` would be one row.
                    Some(width) if db == Db::Mysql => format!("VARBINARY({width})"),
                    _ => f.kind.ddl(db).to_owned(),
                };
                format!("{} {ty}{null}", q(&f.name))
            })
            .collect();
        let key: Vec<String> = self.key.iter().map(|&i| q(&self.fields[i].name)).collect();
        cols.push(format!("PRIMARY KEY ({})", key.join(", ")));
        // Text compares bytewise, as on the other backends.
        let options = if db == Db::Mysql {
            " DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_bin"
        } else {
            ""
        };
        let mut out = vec![format!(
            "CREATE TABLE {} ({}){options}",
            q(&table),
            cols.join(", ")
        )];
        for (unique, cols) in &self.indexes {
            let names: Vec<&str> = cols.iter().map(|&i| self.fields[i].name.as_str()).collect();
            let index = format!(
                "{table}_{}_{}",
                names.join("_"),
                if *unique { "key" } else { "idx" }
            );
            let index = if db == Db::Mysql {
                mysql_identifier(index)
            } else {
                index
            };
            let quoted: Vec<String> = names.iter().map(|n| q(n)).collect();
            out.push(format!(
                "CREATE {}INDEX {} ON {} ({})",
                if *unique { "UNIQUE " } else { "" },
                q(&index),
                q(&table),
                quoted.join(", ")
            ));
        }
        out
    }

    /// For a text or binary field in the primary key or an index: its share
    /// in bytes of InnoDB's index entry (MySQL cannot index LONGTEXT), split
    /// evenly between the variable-width columns of its widest key.
    fn mysql_indexed_width(&self, field: usize) -> Option<usize> {
        let variable =
            |i: &usize| matches!(self.fields[*i].kind, Kind::Text | Kind::Json | Kind::Binary);
        if !variable(&field) {
            return None;
        }
        std::iter::once(&self.key)
            .chain(self.indexes.iter().map(|(_, cols)| cols))
            .filter(|cols| cols.contains(&field))
            .map(|cols| {
                // Fixed-width columns take their share first (8 bytes is an
                // upper bound for every kind but a UUID's 36 characters).
                let fixed: usize = cols
                    .iter()
                    .filter(|i| !variable(i))
                    .map(|i| {
                        if self.fields[*i].kind == Kind::Uuid {
                            144
                        } else {
                            8
                        }
                    })
                    .sum::<usize>()
                    + 64;
                let n = cols.iter().filter(|i| variable(i)).count();
                (MYSQL_INDEX_BYTES - fixed) / n / 4 * 4
            })
            .min()
    }

    fn expand(&self) -> TokenStream {
        let ident = self.ident;
        let table = &self.table;
        let table_name = table.to_string();
        let rust_type = ident.to_string();
        let version = self.version;
        let asynchronous = self.asynchronous;
        let n_columns = self.fields.len();
        let sqlite = self.ddl(Db::Sqlite);
        let postgres = self.ddl(Db::Postgres);
        let mysql = self.ddl(Db::Mysql);

        let table_columns = self.fields.iter().map(|f| {
            let col = f.ident;
            let sql = format_ident!("{}", f.kind.sql());
            if f.nullable {
                quote!(#col -> Nullable<#sql>,)
            } else {
                quote!(#col -> #sql,)
            }
        });
        let key_cols: Vec<_> = self.key.iter().map(|&i| self.fields[i].ident).collect();
        let table_doc =
            format!("Table of the read model [`{rust_type}`], created by the store's `migrate`.");

        let cols: Vec<TokenStream> = self
            .fields
            .iter()
            .map(|f| {
                let c = f.ident;
                quote!(#table::#c)
            })
            .collect();
        let sql_tys: Vec<_> = self.fields.iter().map(Field::sql_ty).collect();
        let row_tys: Vec<_> = self.fields.iter().map(Field::row_ty).collect();
        let build = self.fields.iter().enumerate().map(|(i, f)| {
            let ident = f.ident;
            let index = syn::Index::from(i);
            let value = f.field_value(quote!(row.#index));
            quote!(#ident: #value)
        });
        let insert_values: Vec<_> = self
            .fields
            .iter()
            .map(|f| {
                let c = f.ident;
                let v = f.to_sql(quote!(&self.#c));
                quote!(__diesel::ExpressionMethods::eq(#table::#c, #v))
            })
            .collect();
        let insert_tys: Vec<_> = self
            .fields
            .iter()
            .zip(&row_tys)
            .map(|(f, ty)| {
                let c = f.ident;
                quote!(__diesel::dsl::Eq<#table::#c, #ty>)
            })
            .collect();
        let non_key: Vec<usize> = (0..self.fields.len())
            .filter(|i| !self.key.contains(i))
            .collect();
        let changeset = if non_key.is_empty() {
            TokenStream::new()
        } else {
            let tys: Vec<_> = non_key.iter().map(|&i| &insert_tys[i]).collect();
            let values: Vec<_> = non_key.iter().map(|&i| &insert_values[i]).collect();
            quote! {
                #[automatically_derived]
                impl __diesel::query_builder::AsChangeset for #ident {
                    type Target = #table::table;
                    type Changeset = <(#(#tys,)*) as __diesel::query_builder::AsChangeset>::Changeset;
                    fn as_changeset(self) -> Self::Changeset {
                        __diesel::query_builder::AsChangeset::as_changeset((#(#values,)*))
                    }
                }

                #[automatically_derived]
                impl<'update> __diesel::query_builder::AsChangeset for &'update #ident {
                    type Target = #table::table;
                    type Changeset = <(#(#tys,)*) as __diesel::query_builder::AsChangeset>::Changeset;
                    fn as_changeset(self) -> Self::Changeset {
                        __diesel::query_builder::AsChangeset::as_changeset((#(#values,)*))
                    }
                }
            }
        };

        let key_fields: Vec<&Field> = self.key.iter().map(|&i| &self.fields[i]).collect();
        let key_ty = if key_fields.len() == 1 {
            let b = key_fields[0].base;
            quote!(#b)
        } else {
            let bs = key_fields.iter().map(|f| f.base);
            quote!((#(#bs,)*))
        };
        let key_expr = if key_fields.len() == 1 {
            let c = key_fields[0].ident;
            quote!(::core::clone::Clone::clone(&self.#c))
        } else {
            let cs = key_fields.iter().map(|f| f.ident);
            quote!((#(::core::clone::Clone::clone(&self.#cs),)*))
        };
        // `filter(k)`: the WHERE condition selecting the row of key `k` (a reference).
        let key_filter = |k: TokenStream| -> TokenStream {
            if key_fields.len() == 1 {
                let c = key_fields[0].ident;
                let v = key_fields[0].to_sql(k);
                quote!(__diesel::ExpressionMethods::eq(#table::#c, #v))
            } else {
                let parts: Vec<TokenStream> = key_fields
                    .iter()
                    .enumerate()
                    .map(|(i, f)| {
                        let c = f.ident;
                        let index = syn::Index::from(i);
                        let v = f.to_sql(quote!(&(#k).#index));
                        quote!(__diesel::ExpressionMethods::eq(#table::#c, #v))
                    })
                    .collect();
                let first = &parts[0];
                let rest = &parts[1..];
                quote!(#first #(.and(#rest))*)
            }
        };
        let find_filter = key_filter(quote!(key));
        let row_filter = key_filter(quote!(&__key));
        let select = quote!((#(#cols,)*));
        let (find_many, delete_many) = if key_fields.len() == 1 {
            let c = key_fields[0].ident;
            let v = key_fields[0].to_sql(quote!(k));
            (
                quote! {
                    let keys: ::std::vec::Vec<_> = keys.iter().map(|k| #v).collect();
                    #table::table.filter(__diesel::ExpressionMethods::eq_any(#table::#c, keys)).select(#select).load::<Self>(conn)
                },
                quote! {
                    let keys: ::std::vec::Vec<_> = keys.iter().map(|k| #v).collect();
                    __diesel::delete(#table::table.filter(__diesel::ExpressionMethods::eq_any(#table::#c, keys))).execute(conn)
                },
            )
        } else {
            let one = key_filter(quote!(k));
            (
                quote! {
                    let mut query = #table::table.select(#select).into_boxed();
                    for k in keys {
                        query = query.or_filter(#one);
                    }
                    query.load::<Self>(conn)
                },
                quote! {
                    type __Db = <__es::DbConnection as __diesel::Connection>::Backend;
                    let mut cond: ::core::option::Option<::std::boxed::Box<dyn __diesel::BoxableExpression<#table::table, __Db, SqlType = __diesel::sql_types::Bool>>> = ::core::option::Option::None;
                    for k in keys {
                        let one = #one;
                        cond = ::core::option::Option::Some(match cond {
                            ::core::option::Option::None => ::std::boxed::Box::new(one),
                            ::core::option::Option::Some(prev) => ::std::boxed::Box::new(prev.or(one)),
                        });
                    }
                    __diesel::delete(#table::table.filter(cond.expect("keys is not empty"))).execute(conn)
                },
            )
        };
        // The same read, on PostgreSQL, with each row's version (`xmin`).
        let versioned_select = quote!((__es::RowVersion, #select));
        let find_many_versioned = if key_fields.len() == 1 {
            let c = key_fields[0].ident;
            let v = key_fields[0].to_sql(quote!(k));
            quote! {
                if let [k] = keys {
                    // One key: a query Diesel's statement cache finds by its
                    // type, where `eq_any`'s is built and hashed as text at
                    // every call.
                    #table::table.filter(__diesel::ExpressionMethods::eq(#table::#c, #v)).select(#versioned_select).load::<(i64, Self)>(c)
                } else {
                    let keys: ::std::vec::Vec<_> = keys.iter().map(|k| #v).collect();
                    #table::table.filter(__diesel::ExpressionMethods::eq_any(#table::#c, keys)).select(#versioned_select).load::<(i64, Self)>(c)
                }
            }
        } else {
            let one = key_filter(quote!(k));
            quote! {
                // Its text grows with the keys, and a connection keeps every
                // text it prepared: more keys go in a transaction.
                if keys.len() > 2 {
                    return ::core::result::Result::Ok(::core::option::Option::None);
                }
                let mut query = #table::table.select(#versioned_select).into_boxed();
                for k in keys {
                    query = query.or_filter(#one);
                }
                query.load::<(i64, Self)>(c)
            }
        };
        // A new row's insert as `INSERT … SELECT`, so that it can wait for
        // the append's events (`EventsInserted`).
        let new_row_values: Vec<TokenStream> = self
            .fields
            .iter()
            .zip(&sql_tys)
            .map(|(f, ty)| {
                let c = f.ident;
                let v = f.to_sql(quote!(&row.#c));
                quote!(__diesel::IntoSql::into_sql::<#ty>(#v))
            })
            .collect();
        let guarded_update = if non_key.is_empty() {
            // Nothing to change but the row's version to check: the key
            // set to itself.
            let c = key_fields[0].ident;
            quote! {
                let __key = <Self as __es::ReadModel>::key(row);
                ::core::option::Option::Some(::std::boxed::Box::new(__es::RowUpdate::<Self, _, _, _>::new(
                    __diesel::QuerySource::from_clause(&#table::table),
                    __diesel::query_builder::AsChangeset::as_changeset(__diesel::ExpressionMethods::eq(#table::#c, #table::#c)),
                    #row_filter,
                )))
            }
        } else {
            quote! {
                let __key = <Self as __es::ReadModel>::key(row);
                ::core::option::Option::Some(::std::boxed::Box::new(__es::RowUpdate::<Self, _, _, _>::new(
                    __diesel::QuerySource::from_clause(&#table::table),
                    __diesel::query_builder::AsChangeset::as_changeset(row),
                    #row_filter,
                )))
            }
        };
        let update = if non_key.is_empty() {
            quote!(let _ = (conn, row); ::core::result::Result::Ok(0))
        } else {
            quote! {
                let __key = <Self as __es::ReadModel>::key(row);
                let query = __es::RowUpdate::<Self, _, _, _>::new(
                    __diesel::QuerySource::from_clause(&#table::table),
                    __diesel::query_builder::AsChangeset::as_changeset(row),
                    #row_filter,
                );
                // On the backend's own connection: through `MultiConnection`
                // the statement's text would be written out at every call.
                match conn {
                    __es::DbConnection::Postgres(c) => query.execute(c),
                    __es::DbConnection::Sqlite(c) => query.execute(c),
                    __es::DbConnection::Mysql(c) => query.execute(c),
                }
            }
        };

        let ident_span = ident.span();
        let submit = quote_spanned! {ident_span=>
            __es::inventory::submit! {
                __es::ReadModelEntry {
                    schema: &<#ident as __es::ReadModel>::SCHEMA,
                    new_rows: __es::new_rows::<#ident>,
                    file: ::core::file!(),
                    line: ::core::line!(),
                }
            }
        };

        quote! {
            diesel::table! {
                #[doc = #table_doc]
                #table (#(#key_cols),*) {
                    #(#table_columns)*
                }
            }

            const _: () = {
                use ::es_diesel::__private as __es;
                use ::es_diesel::__private::diesel as __diesel;

                #[automatically_derived]
                impl<__DB: __diesel::backend::Backend> __diesel::deserialize::Queryable<(#(#sql_tys,)*), __DB> for #ident
                where
                    (#(#row_tys,)*): __diesel::deserialize::FromStaticSqlRow<(#(#sql_tys,)*), __DB>,
                {
                    type Row = (#(#row_tys,)*);
                    fn build(row: Self::Row) -> __diesel::deserialize::Result<Self> {
                        ::core::result::Result::Ok(Self { #(#build,)* })
                    }
                }

                #[automatically_derived]
                impl<__DB: __diesel::backend::Backend> __diesel::Selectable<__DB> for #ident {
                    type SelectExpression = (#(#cols,)*);
                    fn construct_selection() -> Self::SelectExpression {
                        (#(#cols,)*)
                    }
                }

                #[automatically_derived]
                impl __diesel::Insertable<#table::table> for #ident {
                    type Values = <(#(#insert_tys,)*) as __diesel::Insertable<#table::table>>::Values;
                    fn values(self) -> Self::Values {
                        __diesel::Insertable::<#table::table>::values((#(#insert_values,)*))
                    }
                }

                #[automatically_derived]
                impl<'insert> __diesel::Insertable<#table::table> for &'insert #ident {
                    type Values = <(#(#insert_tys,)*) as __diesel::Insertable<#table::table>>::Values;
                    fn values(self) -> Self::Values {
                        __diesel::Insertable::<#table::table>::values((#(#insert_values,)*))
                    }
                }

                #[automatically_derived]
                impl __diesel::internal::derives::insertable::UndecoratedInsertRecord<#table::table> for #ident {}

                #changeset

                #[automatically_derived]
                impl __es::ReadModel for #ident {
                    const SCHEMA: __es::ReadModelSchema = __es::ReadModelSchema {
                        name: #table_name,
                        rust_type: #rust_type,
                        version: #version,
                        asynchronous: #asynchronous,
                        columns: #n_columns,
                        sqlite: &[#(#sqlite),*],
                        postgres: &[#(#postgres),*],
                        mysql: &[#(#mysql),*],
                    };

                    type Key = #key_ty;

                    fn key(&self) -> Self::Key {
                        #key_expr
                    }

                    fn find(conn: &mut __es::DbConnection, key: &Self::Key) -> __diesel::QueryResult<::core::option::Option<Self>> {
                        use __diesel::prelude::*;
                        // The key matches one row at most: no LIMIT, whose bound
                        // value SQLite compiles into the statement, preparing it
                        // again at every run.
                        let query = #table::table.filter(#find_filter).select(#select);
                        match conn {
                            __es::DbConnection::Postgres(c) => query.for_update().get_result::<Self>(c).optional(),
                            __es::DbConnection::Mysql(c) => query.for_update().get_result::<Self>(c).optional(),
                            __es::DbConnection::Sqlite(c) => query.get_result::<Self>(c).optional(),
                        }
                    }

                    fn find_many(conn: &mut __es::DbConnection, keys: &[Self::Key]) -> __diesel::QueryResult<::std::vec::Vec<Self>> {
                        use __diesel::prelude::*;
                        if keys.is_empty() {
                            return ::core::result::Result::Ok(::std::vec::Vec::new());
                        }
                        #find_many
                    }

                    fn insert_many(conn: &mut __es::DbConnection, rows: &[Self]) -> __diesel::QueryResult<usize> {
                        use __diesel::prelude::*;
                        let mut n = 0;
                        for chunk in rows.chunks(__es::rows_per_statement(#n_columns)) {
                            // Multi-row INSERT is backend-specific in Diesel (not on its MultiBackend).
                            n += match conn {
                                __es::DbConnection::Postgres(c) => __diesel::insert_into(#table::table).values(chunk).execute(c)?,
                                __es::DbConnection::Sqlite(c) => __diesel::insert_into(#table::table).values(chunk).execute(c)?,
                                __es::DbConnection::Mysql(c) => __diesel::insert_into(#table::table).values(chunk).execute(c)?,
                            };
                        }
                        ::core::result::Result::Ok(n)
                    }

                    fn update(conn: &mut __es::DbConnection, row: &Self) -> __diesel::QueryResult<usize> {
                        use __diesel::prelude::*;
                        #update
                    }

                    fn delete_many(conn: &mut __es::DbConnection, keys: &[Self::Key]) -> __diesel::QueryResult<usize> {
                        use __diesel::prelude::*;
                        if keys.is_empty() {
                            return ::core::result::Result::Ok(0);
                        }
                        #delete_many
                    }

                    fn find_many_versioned(conn: &mut __es::DbConnection, keys: &[Self::Key]) -> __diesel::QueryResult<::core::option::Option<::std::vec::Vec<(i64, Self)>>> {
                        use __diesel::prelude::*;
                        let __es::DbConnection::Postgres(c) = conn else {
                            return ::core::result::Result::Ok(::core::option::Option::None);
                        };
                        if keys.is_empty() {
                            return ::core::result::Result::Ok(::core::option::Option::Some(::std::vec::Vec::new()));
                        }
                        let rows: __diesel::QueryResult<::std::vec::Vec<(i64, Self)>> = { #find_many_versioned };
                        rows.map(::core::option::Option::Some)
                    }

                    fn guarded_write(write: __es::RowWrite<'_, Self>) -> ::core::option::Option<::std::boxed::Box<dyn __diesel::query_builder::QueryFragment<__diesel::pg::Pg>>> {
                        use __diesel::prelude::*;
                        match write {
                            __es::RowWrite::Insert(row) => ::core::option::Option::Some(::std::boxed::Box::new(
                                __diesel::insert_into(#table::table)
                                    .values(__diesel::select((#(#new_row_values,)*)).filter(__es::EventsInserted))
                                    .into_columns((#(#cols,)*)),
                            )),
                            __es::RowWrite::Update(row) => { #guarded_update }
                            __es::RowWrite::Delete(key) => ::core::option::Option::Some(::std::boxed::Box::new(
                                __diesel::delete(#table::table.filter(#find_filter)),
                            )),
                        }
                    }
                }

                #submit
            };
        }
    }
}

/// The column kind of a field type: (type without Option, kind, nullable),
/// or a hint why it has none.
fn classify(ty: &syn::Type) -> Result<(&syn::Type, Kind, bool), String> {
    if let Some(inner) = generic_arg(ty, "Option") {
        if generic_arg(inner, "Option").is_some() {
            return Err(" (an Option of an Option has no single NULL)".into());
        }
        return classify(inner).map(|(b, k, _)| (b, k, true));
    }
    let syn::Type::Path(p) = ty else {
        return Err(String::new());
    };
    if p.qself.is_some() {
        return Err(String::new());
    }
    let seg = p.path.segments.last().ok_or_else(String::new)?;
    let name = seg.ident.to_string();
    if let Some(inner) = generic_arg(ty, "Vec") {
        return if quote!(#inner).to_string() == "u8" {
            Ok((ty, Kind::Binary, false))
        } else {
            Err(" (only Vec<u8> is stored, as bytes; keep lists as serde_json::Value)".into())
        };
    }
    if name == "DateTime" {
        return match generic_arg(ty, "DateTime") {
            Some(tz) if quote!(#tz).to_string().ends_with("Utc") => {
                Ok((ty, Kind::TimestampUtc, false))
            }
            _ => Err(" (only DateTime<Utc> is stored, as a UTC timestamp)".into()),
        };
    }
    if !seg.arguments.is_empty() {
        return Err(String::new());
    }
    let kind = match name.as_str() {
        "i16" => Kind::SmallInt,
        "i32" => Kind::Integer,
        "i64" => Kind::BigInt,
        "f32" => Kind::Float,
        "f64" => Kind::Double,
        "bool" => Kind::Bool,
        "String" => Kind::Text,
        "NaiveDateTime" => Kind::Timestamp,
        "NaiveDate" => Kind::Date,
        "NaiveTime" => Kind::Time,
        "Uuid" => Kind::Uuid,
        "Value"
            if p.path.segments.len() == 1
                || p.path.segments.iter().any(|s| s.ident == "serde_json") =>
        {
            Kind::Json
        }
        "u8" | "u16" | "u32" | "u64" | "u128" | "usize" | "i8" | "i128" | "isize" => {
            return Err(
                " (not every backend has this integer type; i16, i32 and i64 are portable)".into(),
            )
        }
        _ => return Err(String::new()),
    };
    Ok((ty, kind, false))
}

fn generic_arg<'t>(ty: &'t syn::Type, outer: &str) -> Option<&'t syn::Type> {
    let syn::Type::Path(p) = ty else { return None };
    let seg = p.path.segments.last()?;
    if seg.ident != outer {
        return None;
    }
    let syn::PathArguments::AngleBracketed(args) = &seg.arguments else {
        return None;
    };
    args.args.iter().rev().find_map(|a| match a {
        syn::GenericArgument::Type(t) => Some(t),
        _ => None,
    })
}
