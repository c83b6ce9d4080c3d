//! Passive signals: how an exchange ended and whose fault it was, so passive ejection
//! counts only what the backend did, never a client's abort.

// === passive signals: whose fault ===

/// How one exchange with a backend ended, as the request path saw it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ending {
    /// The backend sent a response head with this status.
    Answered(u16),
    /// hyper failed the exchange before a response head. `user`: hyper says the failure
    /// is on our side of the connection (`hyper::Error::is_user()`: the request body we
    /// streamed failed, or a request hyper cannot send); `unsent`: hyper handed the
    /// request back unwritten (the backend closed the connection first).
    Broken {
        /// `hyper::Error::is_user()`.
        user: bool,
        /// The request came back unwritten.
        unsent: bool,
    },
    /// No response head within `protocol_timeout`.
    TimedOut,
    /// The response body broke off while streaming to the client.
    BodyBroken,
}

/// What the client's request body had done when the exchange ended (see
/// [`crate::body::BodyWatch`]). A request without a body was sent in full at once.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BodyFacts {
    /// The body failed on the client's side: aborted, truncated, malformed, too large.
    pub client_failed: bool,
    /// Its last byte had been handed to the backend's connection.
    pub sent: bool,
}

impl BodyFacts {
    /// A request without a body.
    pub const NONE: BodyFacts = BodyFacts {
        client_failed: false,
        sent: true,
    };
}

/// Whose fault an exchange's ending was. Only [`Fault::Backend`] counts towards passive
/// ejection or becomes a backend's `last_error`: clients are attackers here, and nothing a
/// client does to its own request may knock a backend out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// The backend: a connect refused or timed out, a TLS failure, a reset or malformed
    /// response, a 5xx (when `count_5xx`), or no response head within `protocol_timeout`
    /// after the whole request was sent.
    Backend,
    /// The client: it aborted, sent a truncated, malformed or oversized body, or went
    /// away. Counts neither for nor against the backend.
    Client,
    /// Nobody's: the exchange went well, or failed in a way that says nothing about the
    /// backend (a body still streaming when the timeout ran out, a request keyway itself
    /// could not send).
    None,
}

impl Fault {
    /// Decides whose fault `ending` was. Pure, so every case is unit-tested.
    pub fn of(ending: Ending, body: BodyFacts, count_5xx: bool) -> Fault {
        if body.client_failed {
            // Whatever the backend did next (a reset, a 5xx about a truncated body, a
            // wait for bytes that never came), the client caused it.
            return Fault::Client;
        }
        match ending {
            Ending::Answered(status) if status >= 500 && count_5xx => Fault::Backend,
            Ending::Answered(_) => Fault::None,
            // A connection the backend closed before taking the request counts: keyway
            // cannot tell a stale pooled one from a backend that drops every connection.
            Ending::Broken {
                user: true,
                unsent: false,
            } => Fault::None,
            Ending::Broken { .. } | Ending::BodyBroken => Fault::Backend,
            Ending::TimedOut if body.sent => Fault::Backend,
            // The backend may have been reading a slow client's body all along.
            Ending::TimedOut => Fault::None,
        }
    }
}
