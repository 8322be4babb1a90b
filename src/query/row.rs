//! Mapping result rows into Rust types.

use tokio_postgres::{types::FromSqlOwned, Row};

use crate::error::Error;

/// A type that can be built from one result row.
///
/// Implemented for [`Row`] itself and for tuples of up to eight column types (`(i64, String)`
/// reads the first two columns). Implement it for your own structs:
///
/// ```
/// use pgherd::FromRow;
/// use tokio_postgres::Row;
///
/// struct User {
///     id: i64,
///     name: String,
/// }
///
/// impl FromRow for User {
///     fn from_row(row: &Row) -> Result<Self, pgherd::Error> {
///         Ok(User { id: pgherd::column(row, "id")?, name: pgherd::column(row, "name")? })
///     }
/// }
/// ```
pub trait FromRow: Sized {
    /// Builds a value from `row`.
    ///
    /// # Errors
    ///
    /// A [`Mapping`](crate::ErrorKind::Mapping) error when a column is missing or has another
    /// type.
    fn from_row(row: &Row) -> Result<Self, Error>;

    /// Builds one value per row.
    ///
    /// # Errors
    ///
    /// As [`from_row`](Self::from_row), for the first row that does not fit.
    fn from_rows(rows: &[Row]) -> Result<Vec<Self>, Error> {
        rows.iter().map(Self::from_row).collect()
    }
}

/// Reads column `index` (a position or a name) of `row` as `T`, with an error that names the
/// column instead of a panic.
///
/// # Errors
///
/// A [`Mapping`](crate::ErrorKind::Mapping) error when the column is missing or has another type.
pub fn column<T, I>(row: &Row, index: I) -> Result<T, Error>
where
    T: FromSqlOwned,
    I: tokio_postgres::row::RowIndex + std::fmt::Display + Copy,
{
    row.try_get(index)
        .map_err(|error| Error::mapping(format!("column {index}: {error}")))
}

impl FromRow for Row {
    fn from_row(row: &Row) -> Result<Self, Error> {
        Ok(row.clone())
    }
}

macro_rules! tuple_from_row {
    ($($name:ident : $index:tt),+) => {
        impl<$($name: FromSqlOwned),+> FromRow for ($($name,)+) {
            fn from_row(row: &Row) -> Result<Self, Error> {
                Ok(($(column::<$name, usize>(row, $index)?,)+))
            }
        }
    };
}

tuple_from_row!(A: 0);
tuple_from_row!(A: 0, B: 1);
tuple_from_row!(A: 0, B: 1, C: 2);
tuple_from_row!(A: 0, B: 1, C: 2, D: 3);
tuple_from_row!(A: 0, B: 1, C: 2, D: 3, E: 4);
tuple_from_row!(A: 0, B: 1, C: 2, D: 3, E: 4, F: 5);
tuple_from_row!(A: 0, B: 1, C: 2, D: 3, E: 4, F: 5, G: 6);
tuple_from_row!(A: 0, B: 1, C: 2, D: 3, E: 4, F: 5, G: 6, H: 7);
