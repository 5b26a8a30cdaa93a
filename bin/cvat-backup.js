#!/usr/bin/env node
import { holdHeapSmall } from '../dist/src/repository/gc-hint.js';

// Before the modules load (see gc-hint.ts): a small heap on the main thread.
holdHeapSmall();
const { main } = await import('../dist/src/cli/main.js');
main(process.argv.slice(2));
