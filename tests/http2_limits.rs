//! HTTP/2 floods (rapid reset, CONTINUATION, SETTINGS, PING): other clients stay served.
