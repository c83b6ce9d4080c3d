//! Hostile clients speaking raw bytes: the front door answers, and the recording backend
//! receives exactly the requests keyway answered.
