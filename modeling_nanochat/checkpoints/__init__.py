"""Checkpoints on disk: conversion, training state, model directories."""
