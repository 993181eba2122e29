//! mirrordb node: the datastore, its journal, recovery, and the HTTP API.
