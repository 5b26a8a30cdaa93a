#!/usr/bin/env node
import { holdYoungGenerationSmall } from '../dist/src/repository/gc-hint.js';

// Before the modules load (see gc-hint.ts): a small young generation on the main thread.
holdYoungGenerationSmall();
const { main } = await import('../dist/src/cli/main.js');
main(process.argv.slice(2));
