#!/usr/bin/env node
import { holdHeapSmall } from '../dist/src/repository/gc-hint.js';
import { limitMallocArenas } from '../dist/src/fs/native.js';

// Before the modules load (see gc-hint.ts): a small heap on the main thread.
holdHeapSmall();
// Before threads start: two malloc arenas, not one per thread (src/fs/native.ts).
limitMallocArenas(2);
const { main } = await import('../dist/src/cli/main.js');
main(process.argv.slice(2));
