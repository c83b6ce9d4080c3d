//! Connection limits and passive ejection: clients cannot knock a backend out.
