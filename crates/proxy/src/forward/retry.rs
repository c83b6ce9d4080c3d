//! The retry rules of one request, as a small state machine: what may be sent again,
//! and how often. Never re-sends a request that may have reached a backend's
//! application, except one replay of a bodiless GET/HEAD/OPTIONS; every retry costs
//! one of the cluster's `retries` and a token of its retry budget. The copy kept for
//! that replay is made only for an attempt that could be followed by one.

use super::*;

/// One request's retry state.
pub(super) struct Retry {
    /// What the next attempt sends: `None` once an attempt may have reached a backend.
    pending: Option<Request<Body>>,
    /// Method, URI and headers of a bodiless safe request, to rebuild it once; copied
    /// from the request only when an attempt that could be replayed takes it.
    template: Option<(Method, Uri, http::HeaderMap)>,
    /// A bodiless GET, HEAD or OPTIONS with retries configured.
    replayable: bool,
    replayed: bool,
    left: u32,
    /// Backends this request tried (failed, full or answered).
    pub(super) tried: Vec<usize>,
}

/// What to do after a failed attempt.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Next {
    /// Try again (another backend, or the same strategy).
    Again,
    /// Answer the client with the failure.
    GiveUp,
    /// Nothing eligible is left untried: answer that no backend could take it.
    NoneLeft,
}

impl Retry {
    /// The state of a request about to be sent; `retries` from the cluster. Only a
    /// bodiless GET, HEAD or OPTIONS can be replayed after it was sent.
    pub(super) fn new(req: Request<Body>, retries: u32, empty_body: bool) -> Self {
        let replayable = empty_body
            && retries > 0
            && matches!(*req.method(), Method::GET | Method::HEAD | Method::OPTIONS);
        Self {
            pending: Some(req),
            template: None,
            replayable,
            replayed: false,
            left: retries,
            tried: Vec::new(),
        }
    }

    /// The request for this attempt (`None` would be a bug: an attempt after a
    /// failure that allowed no retry). `remaining` is the same question
    /// [`Self::after_exchange_failure`] asks (an eligible backend not in `tried`, which
    /// already holds this attempt's): the copy for a replay is made only when the
    /// answer, a retry left and no replay yet could let one happen, so a request that
    /// cannot be replayed (one eligible backend, `retries = 0`) is never copied.
    pub(super) fn take(
        &mut self,
        remaining: impl FnOnce(&[usize]) -> bool,
    ) -> Option<Request<Body>> {
        if self.replayable
            && !self.replayed
            && self.template.is_none()
            && self.left > 0
            && remaining(&self.tried)
        {
            self.template = self.pending.as_ref().map(|req| {
                (
                    req.method().clone(),
                    req.uri().clone(),
                    req.headers().clone(),
                )
            });
        }
        self.pending.take()
    }

    /// No connection could be had (nothing reached a backend). `remaining`: whether an
    /// eligible backend is left untried; `budget` takes a token of the retry budget.
    pub(super) fn after_connect_failure(
        &mut self,
        retryable: bool,
        remaining: bool,
        budget: impl FnOnce() -> bool,
    ) -> Next {
        if retryable && !remaining {
            return Next::NoneLeft;
        }
        if retryable && self.left > 0 && budget() {
            self.left -= 1;
            return Next::Again;
        }
        Next::GiveUp
    }

    /// An exchange failed. `unsent`: the request, when hyper never wrote it (safe to
    /// send anywhere whatever its method); otherwise only a bodiless safe request is
    /// rebuilt, once.
    pub(super) fn after_exchange_failure(
        &mut self,
        unsent: Option<Request<Body>>,
        remaining: impl FnOnce(&[usize]) -> bool,
        budget: impl FnOnce() -> bool,
    ) -> Next {
        if let Some(r) = unsent {
            self.pending = Some(r);
        }
        if self.pending.is_none() {
            match (&self.template, self.replayed) {
                (Some((m, u, h)), false) => {
                    self.replayed = true;
                    let mut r = Request::new(body::empty());
                    *r.method_mut() = m.clone();
                    *r.uri_mut() = u.clone();
                    *r.headers_mut() = h.clone();
                    self.pending = Some(r);
                }
                _ => return Next::GiveUp,
            }
        }
        if self.left == 0 || !remaining(&self.tried) || !budget() {
            return Next::GiveUp;
        }
        self.left -= 1;
        Next::Again
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(method: Method) -> Request<Body> {
        let mut r = Request::new(body::empty());
        *r.method_mut() = method;
        *r.uri_mut() = Uri::from_static("/a");
        r
    }

    const ANY: fn(&[usize]) -> bool = |_| true;

    #[test]
    fn a_sent_get_is_replayed_once_and_a_sent_post_never() {
        let mut get = Retry::new(req(Method::GET), 3, true);
        assert!(get.take(ANY).is_some());
        assert_eq!(get.after_exchange_failure(None, ANY, || true), Next::Again);
        let again = get.take(ANY).expect("the GET rebuilt");
        assert_eq!((again.method(), again.uri().path()), (&Method::GET, "/a"));
        assert_eq!(get.after_exchange_failure(None, ANY, || true), Next::GiveUp);

        let mut post = Retry::new(req(Method::POST), 3, true);
        assert!(post.take(ANY).is_some());
        assert_eq!(
            post.after_exchange_failure(None, ANY, || true),
            Next::GiveUp
        );
        // A GET with a body is not replayable either.
        let mut with_body = Retry::new(req(Method::GET), 3, false);
        with_body.take(ANY);
        assert_eq!(
            with_body.after_exchange_failure(None, ANY, || true),
            Next::GiveUp
        );
    }

    #[test]
    fn no_copy_is_kept_for_a_replay_that_could_not_happen() {
        // Nothing eligible left besides this attempt's backend.
        let mut get = Retry::new(req(Method::GET), 3, true);
        get.tried.push(0);
        assert!(get.take(|tried| tried != [0]).is_some());
        assert!(get.template.is_none());
        assert_eq!(
            get.after_exchange_failure(None, |tried| tried != [0], || true),
            Next::GiveUp
        );
        // No retries configured.
        let mut none = Retry::new(req(Method::GET), 0, true);
        assert!(none.take(ANY).is_some());
        assert!(none.template.is_none());
        // A backend left: the copy is made, and the replay is the same request.
        let mut two = Retry::new(req(Method::HEAD), 1, true);
        two.tried.push(0);
        assert!(two.take(|tried| !tried.contains(&1)).is_some());
        assert!(two.template.is_some());
        assert_eq!(
            two.after_exchange_failure(None, |tried| !tried.contains(&1), || true),
            Next::Again
        );
        let again = two.take(ANY).expect("the HEAD rebuilt");
        assert_eq!((again.method(), again.uri().path()), (&Method::HEAD, "/a"));
    }

    #[test]
    fn an_unsent_request_goes_again_whatever_its_method_within_the_retries() {
        let mut post = Retry::new(req(Method::POST), 2, false);
        for _ in 0..2 {
            let r = post.take(ANY).unwrap();
            assert_eq!(
                post.after_exchange_failure(Some(r), ANY, || true),
                Next::Again
            );
        }
        let r = post.take(ANY).unwrap();
        assert_eq!(
            post.after_exchange_failure(Some(r), ANY, || true),
            Next::GiveUp,
            "retries spent"
        );
    }

    #[test]
    fn no_backend_left_or_no_budget_ends_the_retries() {
        let mut get = Retry::new(req(Method::GET), 3, true);
        get.take(ANY);
        get.tried.push(0);
        assert_eq!(
            get.after_exchange_failure(None, |tried| tried != [0], || true),
            Next::GiveUp
        );
        let mut r = Retry::new(req(Method::POST), 3, false);
        assert_eq!(r.after_connect_failure(true, true, || false), Next::GiveUp);
        assert_eq!(
            r.after_connect_failure(true, false, || true),
            Next::NoneLeft
        );
        assert_eq!(r.after_connect_failure(false, true, || true), Next::GiveUp);
        let mut budget_calls = 0;
        assert_eq!(
            r.after_connect_failure(true, true, || {
                budget_calls += 1;
                true
            }),
            Next::Again
        );
        assert_eq!(budget_calls, 1);
        let mut none = Retry::new(req(Method::GET), 0, true);
        none.take(ANY);
        assert_eq!(
            none.after_exchange_failure(None, ANY, || panic!("no budget asked with 0 retries")),
            Next::GiveUp
        );
    }
}
