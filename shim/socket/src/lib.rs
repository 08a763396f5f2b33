//! libfsocket.so
