//! Datasets for fedra: loaders for the real distribution formats of the study's three datasets
//! (MNIST IDX, CIFAR-10 binary, Speech Commands WAV turned into MFCC features), the partitioners
//! that split a training set over clients, and the label statistics (EMD) that describe a split.
//!
//! Everything here is plain data: this crate knows nothing of models, training or federation.
