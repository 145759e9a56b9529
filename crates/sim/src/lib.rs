//! In-process simulation of a federated run: clients of a round train in parallel, deterministically
//! whatever the number of threads, with checkpoint and resume.
