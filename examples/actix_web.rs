//! A small REST service over a herd: create, get and list users.
//!
//! ```sh
//! cargo run --example actix_web -- --throwaway     # starts its own throwaway servers
//! cargo run -- dev &                                # or: servers matching Settings.toml ...
//! cargo run --example actix_web -- Settings.toml    # ... and the service pointed at them
//!
//! curl -s -X POST localhost:8080/users -H 'content-type: application/json' \
//!      -d '{"name":"Ada","email":"ada@example.com"}'
//! curl -s localhost:8080/users/1
//! curl -s localhost:8080/users
//! ```
//!
//! The herd is started once, before `HttpServer::new` (whose factory runs once per worker), and
//! shared with every worker through `web::Data`. Writes go to the primary, reads to a standby.

use actix_web::{http::StatusCode, web, App, HttpResponse, HttpServer, Responder, ResponseError};
use pgherd::{
    testkit::Topology, ErrorKind, FromRow, Herd, Intent, Params, Query, QueryResult, Routable,
    Settings, Write,
};
use serde::{Deserialize, Serialize};
use std::{fmt, time::Duration};

/// A user, as stored and as served.
#[derive(Debug, Serialize)]
struct User {
    id: i64,
    name: String,
    email: String,
}

impl FromRow for User {
    fn from_row(row: &tokio_postgres::Row) -> Result<Self, pgherd::Error> {
        Ok(User {
            id: pgherd::column(row, "id")?,
            name: pgherd::column(row, "name")?,
            email: pgherd::column(row, "email")?,
        })
    }
}

/// The body of `POST /users`.
#[derive(Debug, Deserialize)]
struct NewUser {
    name: String,
    email: String,
}

/// Reads one user by id (runs on a standby).
struct GetUser {
    id: i64,
}

impl Query for GetUser {
    type Output = Option<User>;
    const INTENT: Intent = Intent::Read;

    fn sql(&self) -> &str {
        "SELECT id, name, email FROM users WHERE id = $1"
    }
    fn params(&self) -> Params<'_> {
        vec![&self.id]
    }
    fn output(result: QueryResult) -> Result<Option<User>, pgherd::Error> {
        result.optional()
    }
}

/// Lists the first 100 users (runs on a standby).
struct ListUsers;

impl Query for ListUsers {
    type Output = Vec<User>;
    const INTENT: Intent = Intent::Read;

    fn sql(&self) -> &str {
        "SELECT id, name, email FROM users ORDER BY id LIMIT 100"
    }
    fn params(&self) -> Params<'_> {
        Vec::new()
    }
    fn output(result: QueryResult) -> Result<Vec<User>, pgherd::Error> {
        result.all()
    }
}

/// A pgherd error as an HTTP answer: the status says what the client may do.
#[derive(Debug)]
struct ApiError(pgherd::Error);

impl fmt::Display for ApiError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl ResponseError for ApiError {
    fn status_code(&self) -> StatusCode {
        match self.0.kind() {
            ErrorKind::Sql
                if self.0.code() == Some(&tokio_postgres::error::SqlState::UNIQUE_VIOLATION) =>
            {
                StatusCode::CONFLICT
            }
            ErrorKind::Overloaded | ErrorKind::NoTarget | ErrorKind::Connection => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            ErrorKind::Timeout => StatusCode::GATEWAY_TIMEOUT,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

impl From<pgherd::Error> for ApiError {
    fn from(error: pgherd::Error) -> Self {
        ApiError(error)
    }
}

async fn create_user(
    herd: web::Data<Herd>,
    user: web::Json<NewUser>,
) -> Result<impl Responder, ApiError> {
    let written = herd
        .send(
            Write::new("INSERT INTO users (name, email) VALUES ($1, $2) RETURNING id, name, email")
                .bind(user.name.clone())
                .bind(user.email.clone())
                .timeout(Duration::from_secs(2)),
        )
        .await?;
    let created = User::from_rows(&written.rows)?;
    Ok(HttpResponse::Created().json(&created[0]))
}

async fn get_user(herd: web::Data<Herd>, id: web::Path<i64>) -> Result<HttpResponse, ApiError> {
    Ok(match herd.send(GetUser { id: *id }.routed()).await? {
        Some(user) => HttpResponse::Ok().json(user),
        None => HttpResponse::NotFound().finish(),
    })
}

async fn list_users(herd: web::Data<Herd>) -> Result<impl Responder, ApiError> {
    Ok(HttpResponse::Ok().json(herd.send(ListUsers.routed()).await?))
}

#[actix_web::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "pgherd=info".into()),
        )
        .init();
    let argument = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "Settings.toml".into());
    // Kept alive until the server stops; dropping it removes the throwaway servers.
    let mut _throwaway = None;
    let settings = if argument == "--throwaway" {
        let topology = Topology::builder().standbys(1).start().await?;
        let settings = topology.settings();
        _throwaway = Some(topology);
        settings
    } else {
        Settings::load(&argument)?
    };

    // Started once, here, before the server: never inside `HttpServer::new`.
    let herd = Herd::start(settings)?;
    herd.wait_ready(Duration::from_secs(10)).await?;
    herd.send(Write::new(
        "CREATE TABLE IF NOT EXISTS users \
         (id bigserial PRIMARY KEY, name text NOT NULL, email text NOT NULL UNIQUE)",
    ))
    .await?;

    println!("listening on http://127.0.0.1:8080 (Ctrl-C to stop)");
    let data = web::Data::new(herd.clone());
    HttpServer::new(move || {
        App::new()
            .app_data(data.clone())
            .route("/users", web::post().to(create_user))
            .route("/users", web::get().to(list_users))
            .route("/users/{id}", web::get().to(get_user))
    })
    .bind(("127.0.0.1", 8080))?
    .run()
    .await?;
    herd.shutdown().await;
    Ok(())
}
