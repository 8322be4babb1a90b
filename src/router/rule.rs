//! User routing rules: code that picks a message's endpoint or cluster from the message itself,
//! as Django's database routers or SQLAlchemy's `get_bind` do.

use std::{any::Any, fmt};

use crate::query::Intent;

/// What a routing rule sees of a message.
pub struct RouteRequest<'a> {
    pub(crate) intent: Intent,
    pub(crate) message: &'a dyn Any,
    pub(crate) type_name: &'static str,
    pub(crate) cluster: Option<&'a str>,
}

impl<'a> RouteRequest<'a> {
    /// Read or write.
    pub fn intent(&self) -> Intent {
        self.intent
    }

    /// The message's query, if it is a `T`: your [`Query`](crate::Query) type inside a
    /// [`Routed`](crate::Routed), or [`Read`](crate::Read), [`Write`](crate::Write),
    /// [`Batch`](crate::Batch).
    pub fn query<T: Any>(&self) -> Option<&'a T> {
        self.message.downcast_ref::<T>()
    }

    /// The query's type name (`std::any::type_name`), e.g. for logging.
    pub fn type_name(&self) -> &'static str {
        self.type_name
    }

    /// The cluster the message asked for, if any.
    pub fn cluster(&self) -> Option<&'a str> {
        self.cluster
    }
}

impl fmt::Debug for RouteRequest<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RouteRequest")
            .field("intent", &self.intent)
            .field("type_name", &self.type_name)
            .field("cluster", &self.cluster)
            .finish()
    }
}

/// A routing rule's answer.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Route {
    /// No opinion: the next rule, or the default routing, decides.
    Default,
    /// Run on this endpoint (like [`Routable::target`](crate::Routable::target)).
    Endpoint(String),
    /// Run in this cluster, chosen by intent and health as usual.
    Cluster(String),
}

/// A rule consulted for every message that names no explicit target; the first rule with an
/// opinion wins.
///
/// ```
/// use pgherd::{Route, RouteRequest, RoutingRule, Read};
///
/// /// Sends reads of the `reports` schema to the reporting replica.
/// struct Reporting;
///
/// impl RoutingRule for Reporting {
///     fn route(&self, request: &RouteRequest<'_>) -> Route {
///         match request.query::<Read>() {
///             Some(read) if read.sql().contains("reports.") => Route::Endpoint("reporting".into()),
///             _ => Route::Default,
///         }
///     }
/// }
/// ```
pub trait RoutingRule: Send + Sync + 'static {
    /// Decides where `request` goes, or says [`Route::Default`].
    fn route(&self, request: &RouteRequest<'_>) -> Route;
}
