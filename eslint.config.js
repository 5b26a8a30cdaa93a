// Type-aware lint. Layers run one way (fs, docker → deployment/archive → backup/restore → cli):
// a lower layer importing a higher one is an error, and only the CLI may print or exit.
import js from '@eslint/js';
import tseslint from 'typescript-eslint';

const layer = (files, forbidden) => ({
  files,
  rules: {
    'no-restricted-imports': [
      'error',
      { patterns: forbidden.map((dir) => ({ group: [`**/${dir}/*`], message: `layers run one way: this layer must not import ${dir}/` })) },
    ],
  },
});

export default tseslint.config(
  { ignores: ['dist/**', 'node_modules/**', 'bin/**', 'eslint.config.js'] },
  js.configs.recommended,
  ...tseslint.configs.recommendedTypeChecked,
  {
    languageOptions: { parserOptions: { projectService: true, tsconfigRootDir: import.meta.dirname } },
    rules: {
      'no-restricted-syntax': ['error', { selector: 'ExportDefaultDeclaration', message: 'named exports only' }],
      '@typescript-eslint/consistent-type-imports': 'error',
      '@typescript-eslint/no-floating-promises': [
        'error',
        { allowForKnownSafeCalls: [{ from: 'package', package: 'node:test', name: ['describe', 'it', 'test', 'before', 'after'] }] },
      ],
      '@typescript-eslint/only-throw-error': 'error',
    },
  },
  layer(['src/fs/**'], ['docker', 'deployment', 'archive', 'backup', 'restore', 'cli', 'repository', 'backend']),
  layer(['src/docker/**'], ['deployment', 'archive', 'backup', 'restore', 'cli', 'repository', 'backend']),
  layer(['src/backend/**'], ['docker', 'deployment', 'archive', 'backup', 'restore', 'cli', 'repository']),
  layer(['src/repository/**'], ['docker', 'deployment', 'backup', 'restore', 'cli']),
  layer(['src/archive/**'], ['deployment', 'backup', 'restore', 'cli', 'repository', 'backend']),
  layer(['src/deployment/**'], ['backup', 'restore', 'cli']),
  layer(['src/backup/**', 'src/restore/**'], ['cli']),
  {
    files: ['src/**/*.ts'],
    ignores: ['src/cli/**'],
    rules: {
      'no-restricted-properties': [
        'error',
        { object: 'process', property: 'stdout', message: 'the core never prints: emit progress events' },
        { object: 'process', property: 'stderr', message: 'the core never prints: emit progress events' },
        { object: 'process', property: 'exit', message: 'only the CLI ends the process' },
        { object: 'console', property: 'log', message: 'the core never prints: emit progress events' },
      ],
    },
  },
);
